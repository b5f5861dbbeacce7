"""The data a task trains and evaluates on, split by split, and its batches.

``SplitData`` holds each split's samples (less the unreadable files ``check_data`` dropped) and,
once extracted, a frozen backbone's features of the split. ``SplitData.batches`` yields
``(inputs, labels)`` from the features when a split has them, else decoded (and, for training
with augmentation, augmented) images. The data order is given by the caller, so it stays a
function of (seed, epoch) and a resumed run sees the batches an uninterrupted one would.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.augment import AugmentedSamples
from ..data.datasets import SPLITS, BaseDataset, ImageSamples, Sample
from . import distributed as dist

#: A frozen backbone turning a batch of images into its pooled features.
Encoder = Callable[[torch.Tensor], torch.Tensor]


class SplitData:
    """The samples of each split, the features extracted from some, and how they are batched."""

    def __init__(self, dataset: BaseDataset, transform: Callable, train_transform: Callable | None, *,
                 batch_size: int, seed: int, num_workers: int | None):
        self.samples: dict[str, list[Sample]] = {split: list(dataset.samples(split)) for split in SPLITS}
        #: ``(features, labels)`` of the splits a frozen backbone has encoded (from the feature cache).
        self.features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.transform, self.train_transform = transform, train_transform
        self.batch_size, self.seed, self.workers = batch_size, seed, num_workers

    def drop(self, split: str, origins: set[str]) -> None:
        """Leave out the samples declared at ``origins`` (unreadable files)."""
        self.samples[split] = [s for s in self.samples[split] if s.origin not in origins]

    def size(self, split: str) -> int:
        if split in self.features:
            return len(self.features[split][1])
        return len(self.samples[split])

    def num_workers(self, split: str) -> int:
        """DataLoader workers for decoding a split: the configured number, else a guess."""
        if self.workers is not None:
            return self.workers
        samples = self.samples[split]
        if len(samples) < 256 or all(isinstance(s.source, np.ndarray) for s in samples[:50]):
            return 0  # in-memory arrays, or a few files, decode faster than a worker process starts
        return min(4, max(0, (os.cpu_count() or 1) - 1))

    def image_loader(self, split: str, batch_size: int) -> DataLoader:
        """The split's preprocessed images and labels in order (what the feature cache is computed from)."""
        return DataLoader(ImageSamples(self.samples[split], self.transform), batch_size=batch_size,
                          num_workers=self.num_workers(split), generator=torch.Generator().manual_seed(0))

    def batches(self, split: str, order: Sequence[int] | None = None, *, position: int = 0, shard: bool = False,
                epoch: int | None = None, encoder: Encoder | None = None) -> "Batches":
        """The batches of ``split`` in ``order`` (the split's order when None), from batch ``position`` on.

        ``shard`` (training under torchrun): this rank's slice of each global batch. ``epoch``
        (training with augmentation): the images augmented for that epoch, turned into features
        by ``encoder`` when the backbone is frozen."""
        order = list(range(self.size(split))) if order is None else list(order)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)][position:]
        padded = [False] * len(batches)
        if shard:
            batches, padded = dist.shard_batches(batches)
        augment_epoch = epoch if self.train_transform is not None else None
        return Batches(self, split, batches, padded, augment_epoch, encoder)


class Batches:
    """An iterable of ``(inputs, labels)`` for lists of sample indices (made by ``SplitData.batches``)."""

    def __init__(self, data: SplitData, split: str, batches: list[list[int]], padded: list[bool],
                 augment_epoch: int | None, encoder: Encoder | None):
        self.data, self.split, self.batches, self.padded = data, split, batches, padded
        self.augment_epoch, self.encoder = augment_epoch, encoder

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        features = None if self.augment_epoch is not None else self.data.features.get(self.split)
        if features is not None:
            x, y = features
            for idx, padded in zip(self.batches, self.padded):
                idx = torch.as_tensor(idx)
                yield x[idx], dist.mask_padding(y[idx], padded)
            return
        if not self.batches:
            return
        samples = self.data.samples[self.split]
        if self.augment_epoch is None:
            dataset = ImageSamples(samples, self.data.transform)
        else:
            dataset = AugmentedSamples(samples, self.data.train_transform, seed=self.data.seed, epoch=self.augment_epoch)
        loader = DataLoader(dataset, batch_sampler=self.batches, num_workers=self.data.num_workers(self.split),
                            generator=torch.Generator().manual_seed(0))
        encode = self.encoder if self.augment_epoch is not None else None
        for (x, y), padded in zip(loader, self.padded):
            yield (encode(x) if encode is not None else x), dist.mask_padding(y, padded)
