"""Preprocessing: timm's transform for a module, and its split into per-image PIL steps and a
batched normalisation (what the prediction loop uses)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from timm.data import create_transform
from torchvision import transforms as T

from ..hub.manifest import Preprocessing


def build_transform(pre: Preprocessing, *, training: bool = False, augment: dict | None = None):
    """timm's eval (or training) transform for a module's preprocessing."""
    kwargs = dict(input_size=tuple(pre.input_size), interpolation=pre.interpolation, mean=tuple(pre.mean),
                  std=tuple(pre.std), crop_pct=pre.crop_pct)
    if training:
        kwargs.update(is_training=True, **(augment or {}))
    return create_transform(**kwargs)


@dataclass(frozen=True)
class PixelPipeline:
    """A timm eval transform split in two: the PIL steps (decode-side, per image, in threads)
    and ToTensor+Normalize, applied to a whole uint8 batch at once.

    Per-image tensor ops are slow on a few cores (each one starts the intra-op thread
    team); one op over the batch is not. The result equals the per-image transform.
    """

    pil_steps: tuple
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def split(cls, transform) -> "PixelPipeline | None":
        """The split of a ``Compose([...PIL steps, ToTensor, Normalize])``, else None."""
        steps = list(getattr(transform, "transforms", ()))
        if len(steps) < 2 or not isinstance(steps[-1], T.Normalize) or type(steps[-2]).__name__ not in ("ToTensor",
                                                                                                       "MaybeToTensor"):
            return None
        pil_steps = steps[:-2]
        if not all(isinstance(s, (T.Resize, T.CenterCrop)) for s in pil_steps):
            return None
        norm = steps[-1]
        as_column = lambda v: torch.as_tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1)  # noqa: E731
        return cls(tuple(pil_steps), as_column(norm.mean), as_column(norm.std))

    def normalise(self, images: list, *, channels_last: bool) -> torch.Tensor:
        """A float32 NCHW batch from HxWx3 uint8 arrays, as ToTensor+Normalize would make it."""
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # a channels_last view, no copy
        batch = batch.float().div_(255).sub_(self.mean).div_(self.std)
        return batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
