"""The streaming merge (train environment: torch, PEFT): an adapter folded into its full-precision base one tensor at
a time, each result written to its output shard as soon as it is made, so peak memory is one tensor's working copies,
whatever the size of the model or of its shards.

Reading and writing. The output shards are planned from the base's safetensors headers (every tensor's name, shape
and dtype is known before any weight is read), so each shard's header is written first and its tensors are appended
one by one; `save_file` would need the whole shard in memory first. Each input tensor is read from its byte range
with a plain read rather than through `safe_open`'s mapping of the whole shard, whose touched pages would count
against the process's memory until the shard is closed (measured by bench/merge.py: a second shard's worth).
The files are ordinary safetensors (checked with safe_open and transformers by the tests).

For each tensor of each base shard, in file order:
- a weight the adapter targets becomes PEFT's own merge of it: the module is rebuilt around that one weight as
  PEFT's `lora.Linear` / `lora.Embedding` layer (its rank and alpha from the adapter's rank/alpha patterns, rsLoRA,
  DoRA), the adapter's tensors are loaded into it and PEFT's `merge(safe_merge=True)` runs, in float32; the result
  is cast to the output dtype. So W + scale * B @ A, DoRA's magnitude-normalised rule and rsLoRA's scale are PEFT's
  code, not ours;
- a module the adapter saves whole (`modules_to_save`: an lm_head, an embedding) is replaced by the adapter's copy;
- every other tensor is copied through byte for byte (cast only when the output dtype differs).
Tied embeddings: when the adapter changes one side of a tied embedding / lm_head pair, the output unties them (it
writes lm_head.weight and sets tie_word_embeddings false), else loading the merged model would tie the changed
weight back to the unchanged one.

Written by hand (no library streams it): the plan, the reads and the streamed shard writer (the safetensors format
is an 8-byte length, a JSON header and the raw bytes), the index, the grouping of the adapter's tensors by module,
the untying. Everything numeric is PEFT's.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PEFT_PREFIX = "base_model.model."
ADAPTER_PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "m",
                 "lora_embedding_A": "emb_A", "lora_embedding_B": "emb_B", "lora_B.bias": "B_bias"}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SAFETENSORS_DTYPE = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


class MergeError(ValueError):
    """The adapter does not fit the base as stored (a module with no weight, an unsupported adapter form)."""


@dataclass
class Adapter:
    config: Any                                   # peft.LoraConfig
    modules: dict[str, dict[str, Any]]            # module path -> {"A": tensor, "B": ..., "m": ...}
    saved: dict[str, Any]                         # parameter name -> full tensor (modules_to_save)
    base_layers: dict[str, Any] = field(default_factory=dict)  # weight name -> the base weight the adapter carries

    def changes(self, name: str) -> bool:
        return name in self.saved or name.removesuffix(".weight") in self.modules


def load_adapter(adapter_dir: Path) -> Adapter:
    """The adapter's config and tensors (small: an adapter is a fraction of the base), grouped by module."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(adapter_dir))
    if getattr(config, "lora_bias", False):
        raise MergeError("the adapter trains LoRA biases (lora_bias), which this merge does not fold in")
    if config.fan_in_fan_out:
        raise MergeError("the adapter is for Conv1D (fan_in_fan_out) layers, which this merge does not handle")
    modules: dict[str, dict[str, Any]] = {}
    saved: dict[str, Any] = {}
    base_layers: dict[str, Any] = {}
    for key, tensor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        name = key.removeprefix(PEFT_PREFIX)
        for suffix, part in ADAPTER_PARTS.items():
            if name.endswith("." + suffix):
                modules.setdefault(name[: -len(suffix) - 1], {})[part] = tensor
                break
        else:
            if ".base_layer." in name:
                # PEFT saves an adapted embedding's own base weights (save_embedding_layers: the vocabulary may
                # have been resized); base + adapter runs on these, so the merge starts from them
                base_layers[name.replace(".base_layer.", ".")] = tensor
            else:
                saved[re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)] = tensor
    return Adapter(config, modules, saved, base_layers)


def _merged(weight, module: str, parts: dict[str, Any], adapter: Adapter):
    """PEFT's own merge of one module, rebuilt around `weight` (float32)."""
    import torch
    from peft.tuners.lora import layer as lora
    from peft.utils.other import get_pattern_key

    cfg = adapter.config
    r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), module), cfg.r)
    alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), module), cfg.lora_alpha)
    if "emb_A" in parts:
        base = torch.nn.Embedding(*weight.shape)
        base.weight.data = weight
        layer = lora.Embedding(base, "default", config=cfg, r=r, lora_alpha=alpha)
        layer.lora_embedding_A["default"].data = parts["emb_A"].float()
        layer.lora_embedding_B["default"].data = parts["emb_B"].float()
    else:
        if weight.dim() != 2:
            raise MergeError(f"{module}: the adapter targets a {weight.dim()}-D weight; only Linear and Embedding "
                             "layers are merged")
        base = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        base.weight.data = weight
        layer = lora.Linear(base, "default", config=cfg, r=r, lora_alpha=alpha)
        layer.lora_A["default"].weight.data = parts["A"].float()
        layer.lora_B["default"].weight.data = parts["B"].float()
        if "m" in parts:
            layer.lora_magnitude_vector["default"].weight.data = parts["m"].float()
    with torch.no_grad():
        layer.merge(safe_merge=True)
    return base.weight.data


TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
                "U64": "uint64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
CODES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}


@dataclass
class Planned:
    """One output tensor: where it comes from and what it will be."""

    name: str
    dtype: str                 # safetensors code of the output
    shape: tuple[int, ...]
    source: Path | None        # the base shard it is read from (None: the adapter's own tensor)
    source_name: str           # its name there

    @property
    def nbytes(self) -> int:
        from services.core.weights import DTYPE_BYTES

        return int(math.prod(self.shape) * DTYPE_BYTES[self.dtype])


class ShardReader:
    """A base shard's tensors read one at a time from their byte ranges (see the module docstring)."""

    def __init__(self, path: Path):
        from services.core.weights import read_file_header

        self.path = path
        self.tensors = read_file_header(path, field="base")
        with open(path, "rb") as f:
            self.data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        self._file = open(path, "rb")

    def read(self, name: str):
        import torch

        t = self.tensors[name]
        buf = bytearray(t.nbytes)
        self._file.seek(self.data_start + t.begin)
        if self._file.readinto(buf) != t.nbytes:
            raise MergeError(f"{self.path.name}: {name} is truncated")
        if not t.nbytes:
            return torch.empty(t.shape, dtype=getattr(torch, TORCH_DTYPES[t.dtype]))
        return torch.frombuffer(buf, dtype=getattr(torch, TORCH_DTYPES[t.dtype])).reshape(t.shape)

    def close(self) -> None:
        self._file.close()


def plan_shards(tensors: list[Planned], max_bytes: int) -> list[list[Planned]]:
    """Consecutive tensors into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def write_shard(path: Path, planned: list[Planned], produce: Callable[[Planned], Any]) -> int:
    """A safetensors file whose header is written first and whose tensors are appended as `produce` makes them;
    written to a temporary name and renamed into place once complete."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in planned:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in planned:
            tensor = produce(t)
            want = getattr(torch, TORCH_DTYPES[t.dtype])
            if tuple(tensor.shape) != t.shape or tensor.dtype != want:
                raise MergeError(f"{t.name}: made {tuple(tensor.shape)} {tensor.dtype}, planned {t.shape} {want}")
            if tensor.numel():
                f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del tensor
    os.replace(tmp, path)
    return 8 + len(raw) + offset


def base_shards(base_dir: Path) -> list[Path]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        return [base_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(base_dir.glob("*.safetensors"))


@dataclass
class MergeResult:
    shards: list[str]
    merged: list[str]          # tensors PEFT merged
    replaced: list[str]        # tensors the adapter saved whole
    copied: int                # tensors copied through
    untied: bool
    bytes_written: int
    dtype: str


def merge(base_dir: Path, adapter: Adapter, out_dir: Path, dtype: str, max_shard_bytes: int,
          on_shard: Callable[[int, int, int], None] = lambda i, n, nbytes: None) -> MergeResult:
    """Merge `adapter` into the base in `base_dir`, writing shards into `out_dir`; `dtype` is fp32, bf16 or fp16.
    `on_shard(i, n, bytes so far)` before each output shard. Non-weight files (tokenizer, ...) are the caller's to
    copy; config.json is written here (the dtype, and the tie flag when the embeddings are untied)."""
    import torch

    code, target = CODES[dtype], getattr(torch, DTYPES[dtype])
    readers = {shard: ShardReader(shard) for shard in base_shards(base_dir)}
    try:
        where = {name: r for r in readers.values() for name in r.tensors}
        config = json.loads((base_dir / "config.json").read_text())
        text_config = config.get("text_config") or config
        embed, head = "model.embed_tokens.weight", "lm_head.weight"
        missing = [m for m in adapter.modules if f"{m}.weight" not in where]
        missing += [n for n in adapter.saved if n not in where and not (n == head and embed in where)]
        if missing:
            raise MergeError(f"the adapter changes {', '.join(sorted(missing)[:5])}, which the base's checkpoint "
                             "does not hold (another architecture, or a checkpoint whose names differ from its modules)")
        tied = bool(text_config.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
        untie = tied and head not in where and (adapter.changes(embed) or adapter.changes(head))
        planned = []
        for reader in readers.values():
            for name, info in sorted(reader.tensors.items(), key=lambda kv: kv[1].begin):  # file order
                shape = tuple(adapter.base_layers[name].shape) if name in adapter.base_layers else info.shape
                out_code = code if info.dtype in FLOAT_CODES else info.dtype
                if untie and name == embed:
                    planned.append(Planned(head, code, shape, reader.path, name))
                planned.append(Planned(name, out_code, shape, reader.path, name))
        merged, replaced, copied = [], [], 0

        def produce(t: Planned):
            nonlocal copied
            tensor = adapter.base_layers.get(t.source_name)
            tensor = readers[t.source].read(t.source_name) if tensor is None else tensor
            module = t.name.removesuffix(".weight")
            if t.name in adapter.saved:
                replaced.append(t.name)
                return adapter.saved[t.name].to(target)
            if t.name.endswith(".weight") and module in adapter.modules:
                merged.append(t.name)
                return _merged(tensor.float(), module, adapter.modules[module], adapter).to(target)
            copied += 1
            return tensor.to(target) if tensor.is_floating_point() else tensor  # same dtype: byte for byte

        shards = plan_shards(planned, max_shard_bytes)
        names, written = {}, 0
        for i, shard in enumerate(shards):
            on_shard(i + 1, len(shards), written)
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            written += write_shard(out_dir / name, shard, produce)
            names.update({t.name: name for t in shard})
    finally:
        for r in readers.values():
            r.close()
    index = {"metadata": {"total_size": sum(t.nbytes for t in planned)}, "weight_map": dict(sorted(names.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if untie:
        text_config["tie_word_embeddings"] = config["tie_word_embeddings"] = False
    config["dtype"] = DTYPES[dtype]
    if "torch_dtype" in config:
        config["torch_dtype"] = DTYPES[dtype]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return MergeResult(sorted(set(names.values())), merged, replaced, copied, untie, written, dtype)


def base_dtype(base_dir: Path) -> str:
    """The base's weight dtype as fp32 / bf16 / fp16 (the most common among its floating tensors)."""
    from collections import Counter

    from services.core.weights import read_file_header

    counts: Counter[str] = Counter()
    for shard in base_shards(base_dir):
        for t in read_file_header(shard).values():
            if t.dtype in SAFETENSORS_DTYPE:
                counts[SAFETENSORS_DTYPE[t.dtype]] += t.numel
    return counts.most_common(1)[0][0] if counts else "fp32"
