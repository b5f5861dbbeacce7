"""A content-addressed cache of backbone features, so a frozen backbone runs once per data set.

The key is a hash (:func:`hubkit.finetune.config.content_hash`) of everything the features
depend on: the module (name, version, weights sha256), the preprocessing, where the backbone is
cut, custom weights, the precision and the split's content fingerprint. Entries are safetensors
files under ``Cache().features_dir``, written atomically, shared by every run and every process
using that cache. :class:`FrozenBackbone` computes them.
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ..hub.fs import atomic_write_bytes
from ..inference.module import Module
from ..models.classifier import ClassifierModel
from ..models.device import autocast, use_channels_last
from ..models.optimize import fold_batchnorm_for_input


def cached_features_path(directory: Path, key: str) -> Path:
    """Where the entry for ``key`` is (or would be) kept."""
    return Path(directory) / f"{key}.safetensors"


def cached_features(directory: Path, key: str, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(features, labels, was_cached)``: read the entry for ``key`` or compute and store it."""
    path = cached_features_path(directory, key)
    if path.is_file():
        try:
            data = load_file(str(path))
            with contextlib.suppress(OSError):  # a read-only cache still serves its entries
                os.utime(path)  # last used now: `hub cache prune` removes the entries unused the longest
            return data["features"], data["labels"], True
        except (SafetensorError, OSError, KeyError):
            path.unlink(missing_ok=True)  # damaged entry: recompute it
    features, labels = compute()
    features, labels = features.float().contiguous(), labels.long().contiguous()
    atomic_write_bytes(path, save({"features": features, "labels": labels}, metadata={"key": key}))
    return features, labels, False


class FrozenBackbone:
    """The pooled features of image batches, computed by an inference copy of a frozen backbone:
    on a CPU the module's compiled runtime runs it (converted once, kept in the snapshot), else
    torch (BatchNorms folded, channels_last where that helps).

    A copy, because the task's model keeps timm's structure for checkpoints and export; the
    frozen weights never change, so the copy stays in step with it. ``identity`` names what the
    weights are beyond the module's own (custom weights), so a compiled copy is made per weights."""

    def __init__(self, model: ClassifierModel, input_size: tuple[int, int, int], device: torch.device, precision: str,
                 module: Module | None = None, identity: dict | None = None):
        self.device, self.precision = device, precision
        extractor = ClassifierModel(copy.deepcopy(model.backbone), nn.Identity(), model.cut_at)
        extractor.eval().requires_grad_(False)
        self.compiled = None
        if module is not None and device.type == "cpu":
            self.compiled = module.feature_model(extractor, input_size, precision,
                                                 {"cut_at": model.cut_at, **(identity or {})})
        #: What computes the features: a compiled runtime's name or ``"torch"``.
        self.runtime = self.compiled.runtime if self.compiled is not None else "torch"
        #: The torch copy (None on a compiled runtime): backbone cut where ``model`` is cut, no head, folded.
        self.model = None if self.compiled is not None else extractor
        self.channels_last = use_channels_last(device, precision)
        if self.model is not None:
            fold_batchnorm_for_input(self.model.backbone, input_size, device, keep={model.cut_at} - {None})
            if self.channels_last:
                self.model.to(memory_format=torch.channels_last)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 pooled features of a batch of preprocessed images, on the device."""
        if self.compiled is not None:
            return torch.from_numpy(self.compiled.outputs(images.float().contiguous().numpy()))
        x = images.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(self.device, self.precision):
            return self.model.forward_features(x).float()
