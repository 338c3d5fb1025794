"""Merging service logic and settings: check a merge request against the base and the adapter as stored, estimate
its peak memory from the safetensors headers, queue it. No grpc.

Refused before anything is queued (FAILED_PRECONDITION, with what to do): an adapter trained on another base (its
lineage names the base by sha256) or on another architecture; a quantized base (merge into the full-precision base
the lineage names); a QLoRA adapter asked for float32 (it merges into the bf16/fp16 base it was trained from); an
adapter whose modules the base's checkpoint does not hold; a merge that cannot fit the memory budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from services.core.artifacts import ArtifactStore, Manifest
from services.core.errors import FailedPrecondition
from services.core.job_api import JobService
from services.core.jobs import JobRecord, JobRunner, Resources, SubmitOptions
from services.core.keys import validate_name
from services.core.settings import ServiceSettings, port_field
from services.merging.spec import MergeSpec

ADAPTER_FILE = "adapter_model.safetensors"
# the adapter's tensors per module, as PEFT saves them (services.merging.merge reads them the same way)
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".lora_embedding_A",
                 ".lora_embedding_B")
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class MergingSettings(ServiceSettings):
    service: str = "merging"
    port: int = port_field("merging")
    merge_cpus: float = Field(1.0, gt=0, description="CPUs a merge job asks Ray for")
    process_overhead_bytes: int = Field(700 << 20, ge=0, description="a merge process's own memory before any "
                                        "tensor: the interpreter with torch, safetensors and PEFT imported")


@dataclass
class MemoryPlan:
    """The merge's peak host memory (services.merging.merge streams every tensor: nothing else is held): the
    process, one tensor's working copies (as read, in float32, PEFT's safe-merge copy and the delta, the cast
    result) and the adapter's tensors (twice: as loaded and in the rebuilt PEFT layer)."""

    process: int
    tensor_working: int
    adapter: int
    largest_tensor: str

    @property
    def peak(self) -> int:
        return self.process + self.tensor_working + self.adapter

    def describe(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        return (f"~{gib(self.peak)}: the process {gib(self.process)}, the largest tensor's working copies "
                f"{gib(self.tensor_working)} ({self.largest_tensor}), the adapter {gib(self.adapter)}")


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB"


class MergingService:
    SERVICE = "merging"

    def __init__(self, artifacts: ArtifactStore, runner: JobRunner, settings: MergingSettings):
        self.artifacts, self.runner, self.settings = artifacts, runner, settings
        self.jobs = JobService(runner, self.SERVICE)

    async def submit(self, spec: MergeSpec, options: SubmitOptions) -> JobRecord:
        return await self.jobs.submit("merging.merge", "train", lambda: self._check(spec), options,
                                      lambda s: Resources(cpus=self.settings.merge_cpus,
                                                          memory_bytes=s.planned_peak_bytes))

    def _check(self, spec: MergeSpec) -> MergeSpec:
        base = self.artifacts.require(spec.base_model, "spec.base_model", "model")
        adapter = self.artifacts.require(spec.adapter, "spec.adapter", "adapter")
        md, amd = base.metadata, adapter.metadata
        lineage_base = adapter.parents[0] if adapter.parents else None
        if md.get("form") == "quantized" or md.get("quantization"):
            named = f" ({lineage_base.uri})" if lineage_base else ""
            how = md.get("quantization") or "form quantized"
            raise FailedPrecondition(f"spec.base_model: {base.id} is quantized ({how}); merge into the full-precision "
                                     f"base the adapter's lineage names{named}: merging into rounded weights bakes "
                                     "the rounding into the model")
        arch, trained_arch = md.get("architecture", ""), amd.get("base_architecture", "")
        if arch and trained_arch and arch != trained_arch:
            raise FailedPrecondition(f"spec.adapter: {adapter.id} was trained on a {trained_arch}, and {base.id} is "
                                     f"a {arch}; merge it into a base of its own architecture")
        if lineage_base is not None and lineage_base.sha256 and lineage_base.sha256 != base.sha256:
            raise FailedPrecondition(f"spec.adapter: {adapter.id} was trained on {lineage_base.uri} (sha256 "
                                     f"{lineage_base.sha256[:12]}…), not on {base.uri} (sha256 {base.sha256[:12]}…); "
                                     "merge it into the base it was trained on")
        method = amd.get("method", "")
        dtype = spec.output_dtype
        if method == "qlora" and dtype == "fp32":
            raise FailedPrecondition(f"spec.output_dtype: {adapter.id} is a QLoRA adapter, trained against the 4-bit "
                                     "quantization of a bf16/fp16 base; merge it into that bf16/fp16 base (output "
                                     "dtype bf16 or fp16, or auto), never into the 4-bit weights")
        base_tensors = self.artifacts.tensors(base)
        names = {name for tensors in base_tensors.values() for name in tensors}
        if ADAPTER_FILE not in {f.path for f in adapter.files}:
            raise FailedPrecondition(f"spec.adapter: {adapter.id} holds no {ADAPTER_FILE}")
        modules = self._adapter_modules(adapter)
        missing = sorted(m for m in modules if f"{m}.weight" not in names)
        if missing:
            raise FailedPrecondition(f"spec.adapter: {adapter.id} adapts {', '.join(missing[:4])}"
                                     f"{' …' if len(missing) > 4 else ''}, which {base.id}'s checkpoint does not hold: "
                                     "it was trained on another architecture or checkpoint")
        if dtype == "auto":
            dtype = self._base_dtype(base_tensors)
            if method == "qlora" and dtype == "fp32":
                dtype = "bf16"  # QLoRA trains against a bf16 base: merged there, said in the job's events
        plan = self.plan(base_tensors, adapter, dtype)
        if spec.memory_budget_bytes and plan.peak > spec.memory_budget_bytes:
            raise FailedPrecondition(
                f"spec.memory_budget_bytes: the merge needs {plan.describe()}, more than the budget of "
                f"{_gib(spec.memory_budget_bytes)}; give a larger budget, or run it on a node with more memory")
        name = validate_name(spec.name or f"{adapter.name}-merged", "spec.name")
        dataset = adapter.parents[1] if len(adapter.parents) > 1 else None
        return spec.model_copy(update={"base_model": base.ref(), "adapter": adapter.ref(), "output_dtype": dtype,
                                       "name": name, "planned_peak_bytes": plan.peak, "probe_dataset": dataset})

    def _adapter_modules(self, adapter: Manifest) -> set[str]:
        [tensors] = [t for path, t in self.artifacts.tensors(adapter).items() if path == ADAPTER_FILE]
        modules = set()
        for name in tensors:
            name = name.removeprefix("base_model.model.")
            for suffix in LORA_SUFFIXES:
                if name.endswith(suffix):
                    modules.add(name[: -len(suffix)])
        return modules

    @staticmethod
    def _base_dtype(base_tensors) -> str:
        from collections import Counter

        kinds = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}
        counts: Counter[str] = Counter()
        for tensors in base_tensors.values():
            for t in tensors.values():
                if t.dtype in kinds:
                    counts[kinds[t.dtype]] += t.numel
        return counts.most_common(1)[0][0] if counts else "fp32"

    def plan(self, base_tensors, adapter: Manifest, dtype: str) -> MemoryPlan:
        largest = max((t for tensors in base_tensors.values() for t in tensors.values()), key=lambda t: t.numel)
        # as read + float32 copy + PEFT's safe-merge copy + the delta + the cast result
        working = largest.nbytes + 3 * largest.numel * 4 + largest.numel * BYTES[dtype]
        adapter_bytes = 2 * sum(f.size for f in adapter.files if f.path.endswith(".safetensors"))
        return MemoryPlan(self.settings.process_overhead_bytes, working, adapter_bytes, largest.name)
