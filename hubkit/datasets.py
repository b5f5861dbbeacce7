"""Datasets for fine-tuning: labelled images in splits, from folders, list files, CSV or arrays.

Every dataset exposes the same small interface (``label_list``, ``samples(split)``,
``fingerprint(split)``, ``validate()``) so the training code never cares where images
came from. Samples are cheap descriptions (a path or an array plus a label index); images
are decoded lazily by :class:`ImageSamples`, in DataLoader workers.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ._images import load_image
from .errors import DatasetError

SPLITS = ("train", "validate", "test")


@dataclass(frozen=True)
class Sample:
    """One labelled image: a path or an HxW[xC] array, its label index, and where it was declared."""

    source: Any
    label: int
    origin: str = ""


@dataclass(frozen=True)
class DataIssue:
    """One problem found in a dataset, located precisely (file and line, or path)."""

    split: str
    origin: str
    problem: str

    def __str__(self) -> str:
        return f"{self.split}: {self.origin}: {self.problem}"


@dataclass
class DataReport:
    """What ``validate()`` found; ``ok`` when nothing would stop training."""

    issues: list[DataIssue] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> label -> images

    @property
    def ok(self) -> bool:
        return not self.issues


class BaseDataset:
    """Labelled images in up to three splits: train, validate, test."""

    label_list: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.label_list)

    def samples(self, split: str) -> list[Sample]:
        """The samples of ``split`` (an empty list when the dataset has no such split)."""
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        return bool(self.samples(split))

    def fingerprint(self, split: str) -> str:
        """A hash of the split's content, for caches keyed by data (paths, sizes, mtimes, labels)."""
        h = hashlib.sha256("\n".join(self.label_list).encode())
        for s in self.samples(split):
            if isinstance(s.source, np.ndarray):
                h.update(np.ascontiguousarray(s.source).tobytes())
            else:
                st = Path(s.source).stat()
                h.update(f"{s.source}|{st.st_size}|{st.st_mtime_ns}".encode())
            h.update(str(s.label).encode())
        return h.hexdigest()

    def validate(self, *, check_images: bool = True) -> DataReport:
        """Check every split: readable images, known labels, no empty class or split."""
        report = DataReport()
        if self.num_classes < 2:
            report.issues.append(DataIssue("all", "labels", f"needs at least 2 classes, found {self.num_classes}"))
        if not self.samples("train"):
            report.issues.append(DataIssue("train", "split", "the train split is empty"))
        for split in SPLITS:
            samples = self.samples(split)
            counts = {label: 0 for label in self.label_list}
            for s in samples:
                if not 0 <= s.label < self.num_classes:
                    report.issues.append(DataIssue(split, s.origin, f"label index {s.label} is out of range"))
                    continue
                counts[self.label_list[s.label]] += 1
                if check_images:
                    try:
                        load_image(s.source)
                    except DatasetError as exc:
                        report.issues.append(DataIssue(split, s.origin, str(exc)))
                    except Exception as exc:  # load_image raises ImageError; anything else is a bad file too
                        report.issues.append(DataIssue(split, s.origin, str(exc)))
            if samples:
                report.counts[split] = counts
                if split == "train":
                    for label, n in counts.items():
                        if n == 0:
                            report.issues.append(DataIssue(split, label, "class has no images"))
        return report


class ArrayDataset(BaseDataset):
    """Images held in memory as arrays (e.g. scikit-learn's digits), split by index lists or a ratio."""

    def __init__(self, images: Sequence[np.ndarray] | np.ndarray, labels: Sequence[int], label_list: Sequence[str],
                 *, splits: dict[str, Sequence[int]] | None = None, split_ratio: tuple[float, float, float] = (0.7, 0.15, 0.15),
                 seed: int = 0):
        if len(images) != len(labels):
            raise DatasetError(f"{len(images)} images but {len(labels)} labels")
        self.label_list = [str(x) for x in label_list]
        self._all = [Sample(np.asarray(img), int(lab), f"array[{i}]") for i, (img, lab) in enumerate(zip(images, labels))]
        if splits is None:
            order = np.random.default_rng(seed).permutation(len(self._all))
            n_train = int(round(split_ratio[0] * len(order)))
            n_val = int(round(split_ratio[1] * len(order)))
            splits = {"train": order[:n_train], "validate": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
        unknown = set(splits) - set(SPLITS)
        if unknown:
            raise DatasetError(f"unknown split names {sorted(unknown)}; use {', '.join(SPLITS)}")
        self._splits = {name: [self._all[int(i)] for i in idx] for name, idx in splits.items()}

    def samples(self, split: str) -> list[Sample]:
        return self._splits.get(split, [])


class ImageSamples:
    """A torch-style dataset over samples: ``(transform(image), label)`` decoded on demand."""

    def __init__(self, samples: Sequence[Sample], transform: Callable):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        s = self.samples[index]
        return self.transform(load_image(s.source)), s.label
