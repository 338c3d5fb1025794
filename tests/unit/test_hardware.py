"""The compute dtype follows the hardware: bf16 where it is native (a GPU, a CPU with AVX512-BF16 or AMX), float32 on
a CPU that would emulate it (services.core.hardware)."""

from __future__ import annotations

import pytest

from services.core.hardware import compute_dtype, cpu_flags, native_bf16

AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
ZEN4 = "flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16\n"
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"


@pytest.mark.parametrize("cpuinfo, device, native, dtype", [
    (AVX2, "cpu", False, "float32"),
    (ZEN4, "cpu", True, "auto"),
    (SAPPHIRE_RAPIDS, "cpu", True, "auto"),
    (AVX2, "cuda", True, "auto"),        # a GPU computes in the checkpoint's dtype whatever the host CPU is
    ("", "cpu", False, "float32"),       # flags unreadable: do not assume bf16
])
def test_the_compute_dtype_is_selected_by_device_and_cpu_flags(cpuinfo, device, native, dtype):
    flags = cpu_flags(cpuinfo)
    assert native_bf16(device, flags) is native
    assert compute_dtype(device, flags) == dtype


def test_flags_of_this_machine_are_read():
    flags = cpu_flags()
    assert compute_dtype("cpu") == ("auto" if {"avx512_bf16", "amx_bf16"} & flags else "float32")
