"""Datasets for fine-tuning: labelled images in splits, from folders, list files, CSV or arrays.

Every dataset exposes the same small interface (``label_list``, ``samples(split)``,
``fingerprint(split)``, ``validate()``) so the training code never cares where images
came from. Samples are cheap descriptions (a path or an array plus a label index); images
are decoded lazily by :class:`ImageSamples`, in DataLoader workers.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ConfigError, DatasetError, ImageError
from .images import load_image

SPLITS = ("train", "validate", "test")
#: How every dataset without given splits divides its images: train, validate, test.
DEFAULT_SPLIT_RATIO = (0.8, 0.1, 0.1)
#: The CSV column that says each row's split, used when a CSV file has it (``CSVDataset``).
DEFAULT_SPLIT_COLUMN = "split"


@dataclass(frozen=True)
class Sample:
    """One labelled image: a path or an HxW[xC] array, its label index, and where it was declared."""

    source: Any
    label: int
    origin: str = ""


#: What a DataIssue is about: one unusable file or list line (``skip_bad_files`` can drop it), or the
#: dataset's structure (too few classes, an empty train split, a class without usable images).
FILE, STRUCTURE = "file", "structure"


@dataclass(frozen=True)
class DataIssue:
    """One problem found in a dataset, located precisely (file and line, or path), and its kind."""

    split: str
    origin: str
    problem: str
    kind: str = FILE

    def __str__(self) -> str:
        return printable(f"{self.split}: {self.origin}: {self.problem}")


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of non-UTF-8 file names (held as surrogate escapes, which
    cannot be printed or encoded) shown as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _fs_bytes(text: str) -> bytes:
    """Bytes of a file name or label as the file system has them (non-UTF-8 names included)."""
    return text.encode("utf-8", "surrogateescape")


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
    #: Problems found while reading the dataset's description (list files, CSV rows), line by line;
    #: ``validate()`` reports them first.
    parse_issues: tuple[DataIssue, ...] = ()
    #: What ``skip_bad=True`` dropped at construction (empty otherwise).
    skipped: tuple[DataIssue, ...] = ()
    #: How to open this dataset again (``open_dataset``'s arguments, JSON only) when it was opened from a
    #: path; None for data built in Python. A fine-tuning run records it, so ``hub evaluate RUN_DIR`` finds it.
    source: dict | None = None

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
        h = hashlib.sha256(_fs_bytes("\n".join(self.label_list)))
        for s in self.samples(split):
            if isinstance(s.source, np.ndarray):
                h.update(np.ascontiguousarray(s.source).tobytes())
            else:
                try:
                    st = Path(s.source).stat()
                    h.update(_fs_bytes(f"{s.source}|{st.st_size}|{st.st_mtime_ns}"))
                except OSError:
                    h.update(_fs_bytes(f"{s.source}|missing"))
            h.update(str(s.label).encode())
        return h.hexdigest()

    def validate(self, *, check_images: bool = True) -> DataReport:
        """Check every split: readable images, known labels, no empty class or split.

        ``check_images=False`` only checks that image files exist (fast); otherwise every
        image is decoded. ``report.counts`` holds the usable images per split and class.
        """
        report = DataReport(issues=list(self.parse_issues))
        for label in self.label_list:  # labels go into labels.txt, JSON and logs: they must be text
            try:
                label.encode("utf-8")
            except UnicodeEncodeError:
                report.issues.append(DataIssue("all", printable(label), "the class name is not valid UTF-8; "
                                                                        "rename its folder (or label)"))
        if self.num_classes < 2:
            report.issues.append(DataIssue("all", "labels", f"needs at least 2 classes, found {self.num_classes}", STRUCTURE))
        for split in SPLITS:
            samples = self.samples(split)
            problems = _check_samples(samples, self.num_classes, check_images)
            counts = {label: 0 for label in self.label_list}
            for s, problem in zip(samples, problems):
                if problem is None:
                    counts[self.label_list[s.label]] += 1
                else:
                    report.issues.append(DataIssue(split, s.origin, problem))
            if samples or split == "train":
                report.counts[split] = counts
            if split == "train":
                if not samples:
                    report.issues.append(DataIssue("train", "split", "the train split is empty", STRUCTURE))
                else:
                    report.issues.extend(DataIssue(split, label, "class has no usable images", STRUCTURE)
                                         for label, n in counts.items() if n == 0)
        return report


def _check_samples(samples: Sequence[Sample], num_classes: int, check_images: bool) -> list[str | None]:
    """For each sample, what makes it unusable (``None`` when it is fine); images are decoded in threads."""

    def check(s: Sample) -> str | None:
        if not 0 <= s.label < num_classes:
            return f"label index {s.label} is out of range (0..{num_classes - 1})"
        is_file = not isinstance(s.source, np.ndarray)
        where = f": {s.source}" if is_file and Path(s.source).name not in s.origin else ""
        if not check_images:
            return f"no such file{where}" if is_file and not Path(s.source).is_file() else None
        try:
            # JPEGs at 1/8 scale: the whole stream is still read (truncation shows), in half the time
            load_image(s.source, draft_size=1)
        except ImageError as exc:
            return f"{exc.reason}{where}"
        except Exception as exc:  # a decoder failing in an unexpected way is a bad file too
            return f"cannot be decoded ({type(exc).__name__}: {exc})"
        return None

    if not check_images or len(samples) < 2:
        return [check(s) for s in samples]
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(check, samples))


class ArrayDataset(BaseDataset):
    """Images held in memory as arrays (e.g. scikit-learn's digits), split by index lists or a ratio."""

    def __init__(self, images: Sequence[np.ndarray] | np.ndarray, labels: Sequence[int], label_list: Sequence[str],
                 *, splits: dict[str, Sequence[int]] | None = None, split_ratio: tuple[float, float, float] = DEFAULT_SPLIT_RATIO,
                 seed: int = 0, value_range: tuple[float, float] | None = None):
        """``value_range=(lo, hi)`` maps pixel values lo..hi to black..white (e.g. ``(0, 16)`` for
        scikit-learn's digits); without it, ``load_image``'s rule applies (uint8 as is, 0..1 floats
        scaled by 255, anything else stretched so that its maximum is white)."""
        if len(images) != len(labels):
            raise DatasetError(f"{len(images)} images but {len(labels)} labels")
        self.label_list = [str(x) for x in label_list]
        if value_range is not None:
            lo, hi = value_range
            if not hi > lo:
                raise ConfigError(f"value_range must be (low, high) with high > low, not {value_range}")
            images = [np.clip((np.asarray(img, dtype=np.float64) - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)
                      for img in images]
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


class _SplitDataset(BaseDataset):
    """A dataset held as samples per split, with what parsing found and what ``skip_bad`` dropped."""

    def __init__(self, label_list: Sequence[str], splits: dict[str, list[Sample]], parse_issues: Sequence[DataIssue],
                 *, skip_bad: bool):
        self.label_list = list(label_list)
        self._splits = {name: list(samples) for name, samples in splits.items() if samples}
        self.parse_issues = tuple(parse_issues)
        if skip_bad:
            self._drop_bad()

    def samples(self, split: str) -> list[Sample]:
        return self._splits.get(split, [])

    def _drop_bad(self) -> None:
        """Drop unreadable or mislabelled samples, keeping what was dropped in ``skipped``."""
        skipped = list(self.parse_issues)
        for split, samples in self._splits.items():
            problems = _check_samples(samples, self.num_classes, check_images=True)
            skipped += [DataIssue(split, s.origin, p) for s, p in zip(samples, problems) if p is not None]
            self._splits[split] = [s for s, p in zip(samples, problems) if p is None]
        self._splits = {name: samples for name, samples in self._splits.items() if samples}
        self.skipped, self.parse_issues = tuple(skipped), ()


def _normalised_ratio(split_ratio: Sequence[float]) -> tuple[float, float, float]:
    ratio = tuple(float(r) for r in split_ratio)
    if len(ratio) != 3 or min(ratio) < 0 or ratio[0] <= 0:
        raise ConfigError(f"split_ratio must be three non-negative fractions (train, validate, test) with train > 0, "
                          f"not {tuple(split_ratio)}")
    total = sum(ratio)
    return ratio[0] / total, ratio[1] / total, ratio[2] / total


def _stratified_split(samples: Sequence[Sample], num_classes: int, split_ratio: Sequence[float],
                      seed: int) -> dict[str, list[Sample]]:
    """Split each class by ``split_ratio`` (deterministic for a seed; a class never loses its last train image)."""
    _, r_val, r_test = _normalised_ratio(split_ratio)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    out: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda s: s.origin)
        order = np.random.default_rng([seed, label]).permutation(len(members))
        n_val = int(round(r_val * len(members)))
        n_test = int(round(r_test * len(members)))
        while n_val + n_test >= len(members) and n_val + n_test > 0:  # keep at least one training image
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        picked = [members[i] for i in order]
        out["validate"] += picked[:n_val]
        out["test"] += picked[n_val:n_val + n_test]
        out["train"] += picked[n_val + n_test:]
    return out


#: Folder names accepted for each split in the ``train/ validation/ test/`` layout.
SPLIT_FOLDERS = {"train": ("train",), "validate": ("validation", "validate", "val", "dev"), "test": ("test",)}


class ImageFolder(_SplitDataset):
    """Class-per-folder images: ``root/<class>/<image>``, or ``root/{train,validation,test}/<class>/<image>``.

    Without split folders, each class is split by ``split_ratio`` (stratified, deterministic for
    ``seed``). Every file in a class folder is a sample, hidden and non-image files included, so
    that ``validate()`` reports them; ``skip_bad=True`` decodes every image now and drops the bad
    ones (listed in ``skipped``). Files directly in ``root`` (a README, a LICENSE) and hidden
    folders are ignored.
    """

    def __init__(self, root: str | Path, *, split_ratio: tuple[float, float, float] = DEFAULT_SPLIT_RATIO, seed: int = 0,
                 skip_bad: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder {self.root} does not exist or is not a folder")
        split_dirs = self._split_folders(self.root)
        if split_dirs:
            files = {split: self._class_files(folder) for split, folder in split_dirs.items()}
            label_list = sorted({label for per_class in files.values() for label in per_class})
            index = {label: i for i, label in enumerate(label_list)}
            splits = {split: [Sample(str(path), index[label], path.relative_to(self.root).as_posix())
                              for label, paths in per_class.items() for path in paths]
                      for split, per_class in files.items()}
            issues = [DataIssue(split, f"{split_dirs[split].name}/{label}", "class folder is empty")  # train's: validate()
                      for split, per_class in files.items() if split != "train" for label, paths in per_class.items()
                      if not paths]
        else:
            issues = []
            _normalised_ratio(split_ratio)
            per_class = self._class_files(self.root)
            label_list = sorted(per_class)
            samples = [Sample(str(path), i, path.relative_to(self.root).as_posix())
                       for i, label in enumerate(label_list) for path in per_class[label]]
            splits = _stratified_split(samples, len(label_list), split_ratio, seed)
        super().__init__(label_list, splits, issues, skip_bad=skip_bad)

    @staticmethod
    def _split_folders(root: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for split, names in SPLIT_FOLDERS.items():
            present = [root / n for n in names if (root / n).is_dir()]
            if len(present) > 1:
                raise DatasetError(f"{root} has several {split} folders ({', '.join(p.name for p in present)})",
                                   hint="keep one of them")
            if present:
                found[split] = present[0]
        if found and "train" not in found:
            raise DatasetError(f"{root} has {', '.join(p.name + '/' for p in found.values())} but no train/ folder",
                               hint="add train/<class>/ folders, or put the class folders directly in the dataset folder")
        return found

    @staticmethod
    def _class_files(folder: Path) -> dict[str, list[Path]]:
        """Class name -> its files (recursively, sorted), for each non-hidden sub-folder of ``folder``."""
        out = {}
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            out[class_dir.name] = sorted(
                p for p in class_dir.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(class_dir).parts[:-1]))
        return out


class ImageListDataset(_SplitDataset):
    """PaddleHub's list-file layout: ``train_list.txt`` etc. with ``relative/path label`` lines, and ``label_list.txt``.

    The label is the last whitespace-separated token of a line (paths may contain spaces): an
    integer is an index into ``label_list.txt`` (PaddleHub's convention), anything else a label
    name. A missing train list or label list is an error; a missing validate or test list means
    the split is absent. Malformed lines and unknown labels are kept as ``parse_issues`` with
    their ``file:line``, reported by ``validate()`` (and dropped with ``skip_bad=True``).
    """

    def __init__(self, base_path: str | Path, train_list_file: str | None = "train_list.txt",
                 validate_list_file: str | None = "validate_list.txt", test_list_file: str | None = "test_list.txt",
                 label_list_file: str = "label_list.txt", *, skip_bad: bool = False):
        self.base_path = Path(base_path)
        if not self.base_path.is_dir():
            raise DatasetError(f"dataset folder {self.base_path} does not exist or is not a folder")
        label_list = self._read_label_list(self._required(label_list_file, "label list"))
        index = {label: i for i, label in enumerate(label_list)}
        splits: dict[str, list[Sample]] = {}
        issues: list[DataIssue] = []
        lists = {"train": train_list_file, "validate": validate_list_file, "test": test_list_file}
        for split, list_file in lists.items():
            if list_file is None:
                continue
            path = self._required(list_file, f"{split} list") if split == "train" else self.base_path / list_file
            if path.is_file():
                splits[split] = self._read_list(path, split, label_list, index, issues)
        super().__init__(label_list, splits, issues, skip_bad=skip_bad)

    def _required(self, name: str, what: str) -> Path:
        path = self.base_path / name
        if not path.is_file():
            raise DatasetError(f"the {what} file {path} is missing",
                               hint="a list-file dataset needs train_list.txt and label_list.txt")
        return path

    @staticmethod
    def _read_label_list(path: Path) -> list[str]:
        labels = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
        seen: set[str] = set()
        for label in labels:
            if label in seen:
                raise DatasetError(f"label '{label}' appears twice in {path}", hint="each label once, one per line")
            seen.add(label)
        return labels

    def _read_list(self, path: Path, split: str, label_list: list[str], index: dict[str, int],
                   issues: list[DataIssue]) -> list[Sample]:
        samples = []
        for number, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            origin = f"{path.name}:{number}"
            parts = line.strip().rsplit(None, 1)
            if len(parts) != 2:
                issues.append(DataIssue(split, origin, f"malformed line {line.strip()!r}: expected 'relative/path label'"))
                continue
            relative, token = parts
            label = _label_index(token, label_list, index)
            if label is None:
                issues.append(DataIssue(split, origin, f"unknown label '{token}' (not in {len(label_list)} labels of "
                                                       f"label_list.txt, nor an index 0..{len(label_list) - 1})"))
                continue
            samples.append(Sample(str(self.base_path / relative), label, origin))
        return samples


def _read_text(path: Path) -> str:
    """A list, label or CSV file as text, or a DatasetError that names it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                           hint="save it as UTF-8 text") from None
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None


def _label_index(token: str, label_list: list[str], index: dict[str, int]) -> int | None:
    """An integer token is an index into the label list (PaddleHub), any other token a label name."""
    if token.lstrip("-").isdigit() and 0 <= int(token) < len(label_list):
        return int(token)
    return index.get(token)


class CSVDataset(_SplitDataset):
    """Images listed in a CSV file with a header: a path column, a label column, optionally a split column.

    Paths are relative to ``base_path`` (default: the CSV file's folder). Labels are names; the
    label list is ``label_list`` when given (other labels are then reported), else the sorted
    labels found. The split column (by default ``split``, used when the file has one; ``None``
    ignores it) says which split each row is in; without one, each class is split by
    ``split_ratio`` (stratified). Split values: train, validate/validation/val/dev, test. Origins
    are ``file.csv:LINE``.
    """

    def __init__(self, csv_file: str | Path, *, base_path: str | Path | None = None, path_column: str = "path",
                 label_column: str = "label", split_column: str | None = DEFAULT_SPLIT_COLUMN,
                 split_ratio: tuple[float, float, float] = DEFAULT_SPLIT_RATIO, seed: int = 0, skip_bad: bool = False,
                 label_list: Sequence[str] | None = None):
        self.csv_file = Path(csv_file)
        if not self.csv_file.is_file():
            raise DatasetError(f"CSV file {self.csv_file} does not exist")
        self.base_path = Path(base_path) if base_path is not None else self.csv_file.parent
        _normalised_ratio(split_ratio)
        with io.StringIO(_read_text(self.csv_file), newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if split_column == DEFAULT_SPLIT_COLUMN and split_column not in columns:
                split_column = None  # the default column is optional; a column named by the caller is not
            wanted = [c for c in (path_column, label_column, split_column) if c is not None]
            missing = [c for c in wanted if c not in columns]
            if missing:
                raise DatasetError(f"{self.csv_file} has no column {', '.join(repr(c) for c in missing)}",
                                   hint=f"its columns are {', '.join(columns) or 'none (empty file?)'}")
            try:
                rows = [(reader.line_num, row) for row in reader]
            except csv.Error as exc:
                raise DatasetError(f"{self.csv_file} is not a readable CSV file: {exc}") from None
        if label_list is None:
            label_list = sorted({(row[label_column] or "").strip() for _, row in rows} - {""})
        label_list = [str(x) for x in label_list]
        index = {label: i for i, label in enumerate(label_list)}
        split_of = {name: split for split, names in SPLIT_FOLDERS.items() for name in names}
        issues: list[DataIssue] = []
        by_split: dict[str, list[Sample]] = {name: [] for name in SPLITS}
        unsplit: list[Sample] = []
        for line, row in rows:
            origin = f"{self.csv_file.name}:{line}"
            relative, label = (row[path_column] or "").strip(), (row[label_column] or "").strip()
            split = (row[split_column] or "").strip().lower() if split_column else None
            if not relative:
                issues.append(DataIssue(split_of.get(split, "all"), origin, f"empty '{path_column}'"))
            elif label not in index:
                issues.append(DataIssue(split_of.get(split, "all"), origin, f"unknown label '{label}'"))
            elif split_column and split not in split_of:
                issues.append(DataIssue("all", origin, f"unknown split '{split}' (use train, validate or test)"))
            else:
                sample = Sample(str(self.base_path / relative), index[label], origin)
                (by_split[split_of[split]] if split_column else unsplit).append(sample)
        splits = by_split if split_column else _stratified_split(unsplit, len(label_list), split_ratio, seed)
        super().__init__(label_list, splits, issues, skip_bad=skip_bad)


def open_dataset(path: str | Path, *, skip_bad: bool = False, split_column: str | None = DEFAULT_SPLIT_COLUMN,
                 **kwargs) -> BaseDataset:
    """The dataset in ``path``: a list-file dataset when it holds train_list.txt and label_list.txt,
    a CSV dataset for a ``.csv`` file (``split_column`` applies to it), else a class-per-folder one."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        dataset: BaseDataset = CSVDataset(path, skip_bad=skip_bad, split_column=split_column, **kwargs)
    elif (path / "train_list.txt").is_file() and (path / "label_list.txt").is_file():
        dataset = ImageListDataset(path, skip_bad=skip_bad, **kwargs)
    else:
        dataset = ImageFolder(path, skip_bad=skip_bad, **kwargs)
    try:
        dataset.source = json.loads(json.dumps({"path": str(path.resolve()), "skip_bad": skip_bad,
                                                "split_column": split_column, **kwargs}))
    except (TypeError, ValueError):
        dataset.source = None  # arguments that are not data (a transform...) cannot be recorded
    return dataset


class LabelSet(BaseDataset):
    """Class names without images: what predicting with a trained run needs when its data is not at hand."""

    def __init__(self, label_list: Sequence[str]):
        self.label_list = list(label_list)

    def samples(self, split: str) -> list[Sample]:
        return []


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
