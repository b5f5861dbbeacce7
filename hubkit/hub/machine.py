"""What the machine offers, read without torch: native bf16 on the CPU, an NVIDIA driver.

Torch-free so that ``hub run`` can choose a compiled runtime before deciding whether to import torch.
"""
from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def nvidia_driver_present() -> bool:
    """True when an NVIDIA driver is loaded: a CUDA device may exist (torch decides for sure)."""
    return Path("/proc/driver/nvidia/version").exists()
