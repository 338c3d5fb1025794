"""Quantization service logic and settings: check a quantize request against the model as stored (its
architecture from the safetensors headers), find its calibration data through lineage, plan its peak memory, queue
it. No grpc.

Refused before anything is queued, each saying what to do: a model that is not a full-precision model artifact (an
adapter, a dataset, an already-quantized model); an unknown scheme; a calibrated scheme with no calibration dataset
(given or in the model's lineage) or one with no train split; ignore entries that name no module of the
architecture; a group size that does not divide a layer's width; a plan that cannot fit the memory budget or the
largest node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pydantic import Field

from services.core.artifacts import ArtifactStore, Manifest
from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.job_api import JobService
from services.core.jobs import JobRecord, JobRunner, Resources, SubmitOptions
from services.core.keys import validate_name
from services.core.settings import ServiceSettings, port_field
from services.quantization import architecture
from services.quantization.architecture import Architecture
from services.quantization.schemes import GROUP_SIZES, SCHEMES, Scheme
from services.quantization.spec import QuantizeSpec

FLOAT_BYTES = {"F32": 4, "BF16": 2, "F16": 2}


class QuantizationSettings(ServiceSettings):
    service: str = "quantization"
    port: int = port_field("quantization")
    quantize_cpus: float = Field(1.0, gt=0, description="CPUs a quantize job asks Ray for")
    process_overhead_bytes: int = Field(768 << 20, ge=0, description="a quantize process's own memory before any "
                                        "weight: the interpreter with torch, transformers and llmcompressor imported "
                                        "(measured 515 MiB here)")
    resident_weight_bytes: int = Field(256 << 20, ge=0, description="weights kept in RAM while calibrating; the "
                                       "rest are offloaded to local disk and onloaded one layer at a time")


@dataclass
class MemoryPlan:
    """The quantize job's peak host memory. The weights stay on local disk beyond `resident` bytes
    (compressed-tensors' offloading); the sequential pipeline onloads one decoder layer at a time, calibrates it
    on the cached activations of every sample, quantizes it and moves on; the output is written shard by shard."""

    process: int
    resident: int
    layer: int           # one decoder layer's weights in float32 while it is calibrated, and its rounding copy
    hessians: int        # GPTQ's per-Linear Hessians (in_features² float32) of one layer
    activations: int     # the samples' hidden states into and out of the layer being calibrated
    largest: int         # the largest tensor outside the layers (embeddings, lm_head), onloaded in float32
    model_bytes: int
    notes: list[str] = field(default_factory=list)

    # What the terms above do not account for yet: measured peaks ran up to 14% above their sum (bench/quantize.py,
    # a 24-layer 1.34 GiB model) and 1.3% above it on SmolLM2 under load (the CI demo). Until the missing term is
    # found, the plan carries this headroom on top, so the budget Ray reserves still holds the job.
    HEADROOM = 0.15

    @property
    def terms(self) -> int:
        return self.process + self.resident + self.layer + self.hessians + self.activations + self.largest

    @property
    def peak(self) -> int:
        return int(self.terms * (1 + self.HEADROOM))

    def describe(self) -> str:
        g = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        return (f"~{g(self.peak)} for a {g(self.model_bytes)} model: the process {g(self.process)}, resident "
                f"weights {g(self.resident)} (the rest on local disk), one layer {g(self.layer)}, its Hessians "
                f"{g(self.hessians)}, calibration activations {g(self.activations)}, the largest other tensor "
                f"{g(self.largest)}, and {self.HEADROOM:.0%} headroom for what the terms miss")


@dataclass
class Plan:
    spec: QuantizeSpec
    scheme: Scheme
    arch: Architecture
    memory: MemoryPlan
    quantized_modules: int
    output_bytes: int
    largest_node_bytes: int
    warnings: list[str] = field(default_factory=list)


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB"


class QuantizationService:
    SERVICE = "quantization"

    def __init__(self, artifacts: ArtifactStore, runner: JobRunner, settings: QuantizationSettings):
        self.artifacts, self.runner, self.settings = artifacts, runner, settings
        self.jobs = JobService(runner, self.SERVICE)

    async def submit(self, spec: QuantizeSpec, options: SubmitOptions) -> JobRecord:
        return await self.jobs.submit("quantization.quantize", "quantize", lambda: self.plan(spec).spec, options,
                                      lambda s: Resources(cpus=self.settings.quantize_cpus,
                                                          memory_bytes=s.planned_peak_bytes))

    # ------------------------------------------------------------------ checks and the plan
    def plan(self, spec: QuantizeSpec) -> Plan:
        scheme = SCHEMES.get(spec.scheme)
        if scheme is None:
            raise InvalidArgument.field("spec.scheme", f"{spec.scheme or 'nothing'} is not a scheme; give one of "
                                        + ", ".join(SCHEMES))
        model = self.artifacts.require(spec.model, "spec.model", "model")
        self._full_precision(model)
        config = self._config(model)
        tensors = self.artifacts.tensors(model)
        flat = {name: t for file in tensors.values() for name, t in file.items()}
        arch = architecture.read(config, flat)
        if not arch.linears:
            raise FailedPrecondition(f"spec.model: {model.id} has no Linear layers in its safetensors files")
        bad = architecture.check_ignore(arch, spec.ignore)
        if bad:
            raise InvalidArgument.field("spec.ignore", f"{', '.join(map(repr, bad))} match no module of {model.id} "
                                        f"(a {model.metadata.get('architecture', 'model')}); its modules are "
                                        + ", ".join(arch.kinds()) + " (give exact names, or re:<pattern>)")
        if scheme.family == "gguf" and spec.ignore:
            raise InvalidArgument.field("spec.ignore", f"{scheme.name}: llama.cpp chooses each tensor's type itself "
                                        "(norms, MoE routers and small tensors stay in float; Q4_K_M keeps some "
                                        "layers at Q6_K): an ignore list applies to the compressed-tensors schemes")
        ignore = arch.always_ignored() + [e for e in spec.ignore if e not in arch.always_ignored()]
        group_size = self._group_size(spec, scheme, arch, ignore)
        dataset, source = self._calibration(spec, scheme, model)
        name = validate_name(spec.name or f"{model.name}-{scheme.name}", "spec.name")
        memory = self.memory_plan(scheme, arch, flat, spec) if scheme.family != "gguf" else self.gguf_memory(flat)
        quantized = arch.quantized(ignore)
        output = self._output_bytes(flat, quantized, scheme, group_size)
        largest_node = int(max((float(n.get("memory", 0.0)) for n in self.runner.nodes()), default=0.0))
        budget = spec.memory_budget_bytes or largest_node
        if budget and memory.peak > budget:
            where = "the budget of" if spec.memory_budget_bytes else "the largest node's memory,"
            raise FailedPrecondition(f"the quantize job would need {memory.describe()}; more than {where} "
                                     f"{_gib(budget)}: run it on a node with more memory, or lower "
                                     "TUNERY_QUANTIZATION_RESIDENT_WEIGHT_BYTES or the calibration samples / length")
        warnings = []
        if scheme.gpu_only_serving:
            warnings.append(f"{scheme.name} makes a checkpoint only a GPU serves: {scheme.gpu_only_serving}")
        if arch.routers:
            warnings.append(f"{len(arch.routers)} MoE routers and gates kept at full precision")
        resolved = spec.model_copy(update={
            "model": model.ref(), "calibration_dataset": dataset.ref() if dataset else None,
            "calibration_source": source, "resolved_ignore": ignore, "group_size": group_size, "name": name,
            "resident_weight_bytes": memory.resident, "planned_peak_bytes": memory.peak,
            "model_bytes": memory.model_bytes})
        return Plan(resolved, scheme, arch, memory, len(quantized), output, largest_node, warnings)

    def _full_precision(self, model: Manifest) -> None:
        md = model.metadata
        if md.get("form") == "quantized" or md.get("quantization"):
            base = next((p.uri for p in model.parents), "")
            raise FailedPrecondition(f"spec.model: {model.id} is already quantized ({md.get('quantization') or 'form'}"
                                     f" {md.get('quantization_scheme', '')}".rstrip() + "); quantize the "
                                     f"full-precision model{' it was made from (' + base + ')' if base else ''}: "
                                     "rounding rounded weights compounds the error")

    def _config(self, model: Manifest) -> dict:
        if "config.json" not in {f.path for f in model.files}:
            raise FailedPrecondition(f"spec.model: {model.id} has no config.json")
        return json.loads(self.artifacts.read_file(model.id, "config.json"))

    def _group_size(self, spec: QuantizeSpec, scheme: Scheme, arch: Architecture, ignore: list[str]) -> int:
        if not scheme.grouped:
            if spec.group_size:
                raise InvalidArgument.field("spec.group_size", f"{scheme.name} quantizes weights per channel; a "
                                            "group size applies only to the W4A16 schemes (gptq-w4a16, awq-w4a16)")
            return 0
        if spec.group_size:
            bad = architecture.indivisible(arch, ignore, spec.group_size)
            if bad:
                fits = [g for g in GROUP_SIZES if not architecture.indivisible(arch, ignore, g)]
                widths = "; ".join(f"{w} ({len(ms)} layers: {ms[0]}{', …' if len(ms) > 1 else ''})"
                                   for w, ms in sorted(bad.items()))
                raise InvalidArgument.field(
                    "spec.group_size", f"{spec.group_size} does not divide the input widths {widths}; "
                    + (f"give {fits[0]}" if fits else "give a divisor of every layer width")
                    + " or add those layers to spec.ignore")
            return spec.group_size
        for g in GROUP_SIZES:
            if not architecture.indivisible(arch, ignore, g):
                return g
        widths = sorted({w for _, w in arch.quantized(ignore).values()})
        raise FailedPrecondition(f"no group size of {', '.join(map(str, GROUP_SIZES))} divides every layer width "
                                 f"({', '.join(map(str, widths))}); give spec.group_size, or add the odd layers to "
                                 "spec.ignore")

    def _calibration(self, spec: QuantizeSpec, scheme: Scheme, model: Manifest) -> tuple[Manifest | None, str]:
        if spec.calibration_dataset is not None and spec.calibration_dataset.uri:
            data = self.artifacts.require(spec.calibration_dataset, "spec.calibration_dataset", "dataset")
            source = "given"
        elif not scheme.calibrated:
            return None, ""
        else:
            data = self._training_data_of(model)
            if data is None:
                raise InvalidArgument.field(
                    "spec.calibration_dataset", f"{scheme.name} calibrates on data, and {model.id}'s lineage names "
                    "no prepared dataset (it is not a merge of a Tunery-trained adapter); give a prepared dataset, "
                    "ideally the one the model was fine-tuned on")
            source = "the data the model was fine-tuned on (through its lineage)"
        if "train.jsonl" not in {f.path for f in data.files} or data.metadata.get("stage") != "prepared":
            raise FailedPrecondition(f"spec.calibration_dataset: {data.id} has no train split (stage "
                                     f"{data.metadata.get('stage', '?')}); prepare it first (tunery data prepare), "
                                     "then calibrate on the prepared dataset")
        if not scheme.calibrated:
            source = "given (not used: " + scheme.name + " is data-free)"
        return data, source

    def _training_data_of(self, model: Manifest) -> Manifest | None:
        """The prepared dataset the model's adapter was trained on: model (merged) -> adapter -> dataset."""
        for m in self.artifacts.lineage(model.id, max_depth=3)[1:]:
            if m.kind == "dataset" and m.metadata.get("stage") == "prepared":
                return m
        return None

    def memory_plan(self, scheme: Scheme, arch: Architecture, flat: dict, spec: QuantizeSpec) -> MemoryPlan:
        s = self.settings
        model_bytes = sum(t.nbytes for t in flat.values())
        layers: dict[str, int] = {}
        hessians: dict[str, int] = {}
        for name, t in flat.items():
            idx = architecture.LAYER_INDEX.search(name)
            key = name[: idx.end()] if idx else ""
            if not key:
                continue
            numel = 1
            for d in t.shape:
                numel *= int(d)
            layers[key] = layers.get(key, 0) + numel * 4
            module = name.removesuffix(".weight")
            if scheme.calibrated and module in arch.linears:
                width = arch.linears[module][1]
                hessians[key] = hessians.get(key, 0) + width * width * 4
        outside = [t for n, t in flat.items() if not architecture.LAYER_INDEX.search(n)]
        largest = max((t.nbytes // FLOAT_BYTES.get(t.dtype, 4) * 4 for t in outside), default=0)
        layer = 2 * max(layers.values(), default=0)
        samples = spec.num_calibration_samples if scheme.calibrated else 1
        hidden = arch.hidden_size or 1
        activations = 2 * samples * spec.calibration_max_seq_len * hidden * 4 if scheme.calibrated else 0
        resident = min(model_bytes, s.resident_weight_bytes)
        return MemoryPlan(s.process_overhead_bytes, resident, layer, max(hessians.values(), default=0), activations,
                          largest, model_bytes)

    def gguf_memory(self, flat: dict) -> MemoryPlan:
        """The GGUF job's peak: the float32 reference model (greedy answers to compare with) and the float32
        GGUF the converter writes and llama.cpp reads back (memory-mapped, so resident when it is read)."""
        model_bytes = sum(t.nbytes for t in flat.values())
        f32 = sum(t.nbytes // FLOAT_BYTES.get(t.dtype, 4) * 4 for t in flat.values())
        return MemoryPlan(self.settings.process_overhead_bytes, f32, 0, 0, 0, f32, model_bytes,
                          notes=["GGUF: the float32 reference model and the float32 GGUF, converted and read back"])

    @staticmethod
    def _output_bytes(flat: dict, quantized: dict, scheme: Scheme, group_size: int) -> int:
        total = 0
        for name, t in flat.items():
            module = name.removesuffix(".weight")
            if module in quantized and name.endswith(".weight"):
                out, width = quantized[module]
                scales = out * (width // group_size if group_size else 1) * 2
                total += out * width * scheme.weight_bits // 8 + scales
            else:
                total += t.nbytes
        return total
