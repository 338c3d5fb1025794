"""What a safetensors file says about its tensors, read from its header alone (the first 8 + N bytes): names,
dtypes, shapes, byte ranges. Used where the weights themselves must not be loaded: the registry's import checks,
the merge planner's memory estimate (through ranged reads of stored blobs). Pure Python, no torch."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

from services.core.errors import InvalidArgument

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 0.5,
               "F6_E2M3": 0.75, "F6_E3M2": 0.75}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the file's data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(read: Callable[[int, int], bytes], size: int, where: str,
                field: str = "spec.source") -> dict[str, TensorInfo]:
    """The tensors of a safetensors file of `size` bytes, `read(offset, length)` giving its bytes; every offset is
    checked against the dtype, the shape and the file, so a corrupt or truncated file is refused by name."""
    raw = read(0, 8)
    if len(raw) < 8:
        raise InvalidArgument.field(field, f"{where} is truncated (no safetensors header)")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER or n + 8 > size:
        raise InvalidArgument.field(field, f"{where}: header length {n} does not fit the file ({size} bytes)")
    try:
        header = json.loads(read(8, n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument.field(field, f"{where}: safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise InvalidArgument.field(field, f"{where}: the safetensors header is not a JSON object")
    body = size - 8 - n
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in t["data_offsets"])
            shape = tuple(int(x) for x in t["shape"])
            dtype = str(t["dtype"])
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument.field(field, f"{where}: tensor {name} has no dtype, shape or data_offsets") from None
        want = math.prod(shape) * DTYPE_BYTES.get(dtype, 0)
        if end > body or begin > end or (want and end - begin != int(want)):
            raise InvalidArgument.field(
                field, f"{where}: tensor {name} ({dtype} {list(shape)}) has offsets {begin}..{end} that do not match "
                f"its size or the file (body {body} bytes); the file is corrupt or truncated")
        out[name] = TensorInfo(name, dtype, shape, begin, end)
    return out


def read_file_header(path, field: str = "spec.source") -> dict[str, TensorInfo]:
    """read_header over a local file."""
    import os

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        def read(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        return read_header(read, size, os.path.basename(path), field)
