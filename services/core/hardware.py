"""What this worker's processor can do, read from /proc/cpuinfo, and the compute dtype that follows from it. Pure
Python: the control plane and every job environment import it.

A 16-bit model (bf16 weights) is computed in bf16 where the hardware does bf16 arithmetic natively (a GPU; a CPU
with AVX512-BF16 or AMX). Elsewhere (an AVX2 CPU) torch emulates bf16 matmuls by converting every operand, which
made the GPTQ calibration of SmolLM2-135M 1.9x slower than in float32 on this project's machines: such a CPU computes
in float32, and the job stores its output in the model's own dtype again.
"""

from __future__ import annotations

from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The flags of the first processor in /proc/cpuinfo (or in `cpuinfo`); empty where it cannot be read."""
    try:
        text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def native_bf16(device: str, flags: set[str] | None = None) -> bool:
    """Whether `device` ("cpu" | "cuda") does bf16 arithmetic natively."""
    if device != "cpu":
        return True
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def compute_dtype(device: str, flags: set[str] | None = None) -> str:
    """The dtype a job loads a model in to compute with it: "auto" (the checkpoint's own) where bf16 is native,
    "float32" on a CPU that would emulate it."""
    return "auto" if native_bf16(device, flags) else "float32"
