"""Reading weight files safely and mapping their keys onto a timm architecture.

Only two readers exist: safetensors, and ``torch.load(weights_only=True)``, which refuses
any pickle that would construct objects beyond tensors and plain containers. A file that
tries is reported as unsafe and never executed.
"""
from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from ..errors import UnsafeContentError, WeightsError
from ..hub.fs import follow_umask
from ..hub.manifest import KeyMap

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def load_state_dict(path: str | Path) -> "OrderedDict[str, torch.Tensor]":
    """Tensors of a weights file (safetensors, or a tensors-only torch pickle)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    is_zip_or_pickle = head[:2] == b"PK" or head[:1] == b"\x80"
    if path.suffix == ".safetensors" or not is_zip_or_pickle:
        try:
            return OrderedDict(load_file(str(path)))
        except Exception as exc:  # SafetensorError, or whatever a damaged header makes the reader raise
            raise WeightsError(f"{path} is not a valid safetensors file: {exc}",
                               hint="the file is damaged; reinstall or re-export the module") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own text is a page about its defaults; the one useful part is what the pickle would call
        called = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise UnsafeContentError(f"{path} carries pickled code or objects that are not tensors; refusing to load it"
                                 + (f" (it would call {called[1][:100]})" if called else ""),
                                 hint="convert it to safetensors where it came from, if you trust its author") from None
    except Exception as exc:  # a damaged file makes torch raise almost anything (IndexError, KeyError...)
        raise WeightsError(f"{path} is not a readable PyTorch weights file: {type(exc).__name__}: {str(exc)[:200]}",
                           hint="the file is damaged; fetch it again") from None
    while isinstance(data, Mapping) and len(data) == 1 and next(iter(data)) in WRAPPER_KEYS:
        data = next(iter(data.values()))
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise WeightsError(f"{path} does not hold a flat mapping of names to tensors")
    return OrderedDict(data)


def map_state_dict(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], key_map: KeyMap,
                   *, what: str = "weights") -> "OrderedDict[str, torch.Tensor]":
    """Rename ``source`` keys onto ``target``'s (per ``key_map``) and check every shape."""
    if key_map.kind == "position":
        if len(source) != len(target):
            raise WeightsError(f"{what}: {len(source)} tensors cannot map by position onto {len(target)} in the model")
        pairs = list(zip(target.items(), source.items()))
        for (tk, tv), (sk, sv) in pairs:
            if tuple(tv.shape) != tuple(sv.shape):
                raise WeightsError(f"{what}: by position, '{sk}' {tuple(sv.shape)} lands on '{tk}' {tuple(tv.shape)}")
        return OrderedDict((tk, _as_model_dtype(sv, tv, tk, what)) for (tk, tv), (_, sv) in pairs)
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in source.items():
        if any(key.startswith(d) for d in key_map.drop):
            continue
        for old, new in key_map.rename:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    missing = [k for k in target if k not in out]
    unexpected = [k for k in out if k not in target]
    if missing or unexpected:
        raise WeightsError(f"{what}: {len(missing)} model tensors missing (e.g. {missing[:3]}), "
                           f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})",
                           hint="fix the manifest's weights.key_map")
    for key, value in out.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise WeightsError(f"{what}: '{key}' has shape {tuple(value.shape)}, the model expects {tuple(target[key].shape)}")
    return OrderedDict((k, _as_model_dtype(out[k], target[k], key, what)) for k in target)


def _as_model_dtype(value: torch.Tensor, target: torch.Tensor, key: str, what: str) -> torch.Tensor:
    """``value`` in the dtype the model has for ``key``: floats of another width (float16, bfloat16,
    float64) are cast; integers, booleans or complex numbers where the model has floats are refused (they
    would be quantised or meaningless weights), and so are NaN or infinite values."""
    if target.dtype.is_floating_point:
        if not value.dtype.is_floating_point:
            raise WeightsError(f"{what}: '{key}' is {value.dtype}, the model needs floating-point weights",
                               hint="convert the file to float32 (or float16/bfloat16) where it came from")
        if not bool(torch.isfinite(value).all()):
            raise WeightsError(f"{what}: '{key}' holds NaN or infinite values", hint="the weights are broken; get them again")
    elif value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise WeightsError(f"{what}: '{key}' is {value.dtype}, the model keeps {target.dtype} there")
    return value if value.dtype == target.dtype else value.to(target.dtype)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata=dict(metadata or {}))
    follow_umask(path)  # safetensors creates the file 0600; a shared cache or export must stay readable
