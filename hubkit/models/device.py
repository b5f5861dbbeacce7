"""Where and how tensors run: device choice, reduced precision, memory format.

Fast paths are chosen automatically and can be overridden: on a CPU with native bf16
(AVX-512 BF16 or AMX) inference runs in bf16 autocast with channels_last, on CUDA in
fp16/bf16 autocast; everywhere else in fp32.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError
from ..hub.machine import cpu_has_native_bf16

#: Devices by name: "auto" is CUDA when there is one, else the CPU (``resolve_device`` also takes "cuda:1" etc.).
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present; asking for CUDA without one is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA was asked for but no CUDA device is available", hint="use --device cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'", hint=f"use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(device: torch.device, precision: str) -> bool:
    """channels_last helps convolutions on CUDA and with oneDNN on the CPU."""
    return device.type == "cuda" or precision != "fp32" or torch.backends.mkldnn.is_available()
