"""A content-addressed cache of backbone features, so a frozen backbone runs once per data set.

The key is a hash of everything the features depend on: the module (name, version, weights
sha256), the preprocessing, where the backbone is cut, custom weights, the precision and the
split's content fingerprint. Entries are safetensors files under ``Cache().features_dir``,
written atomically, shared by every run and every process using that cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from .._fs import atomic_write_bytes


def feature_key(**parts) -> str:
    """A stable hash of the JSON-able ``parts`` the features depend on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cached_features(directory: Path, key: str, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(features, labels, was_cached)``: read the entry for ``key`` or compute and store it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    path = Path(directory) / f"{key}.safetensors"
    if path.is_file():
        try:
            data = load_file(str(path))
            return data["features"], data["labels"], True
        except (SafetensorError, OSError, KeyError):
            path.unlink(missing_ok=True)  # damaged entry: recompute it
    features, labels = compute()
    features, labels = features.float().contiguous(), labels.long().contiguous()
    atomic_write_bytes(path, save({"features": features, "labels": labels}, metadata={"key": key}))
    return features, labels, False
