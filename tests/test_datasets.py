"""Datasets on real images: class-per-folder, PaddleHub list files, CSV, arrays; validate() and `hub validate-data`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from hubkit.data.datasets import DEFAULT_SPLIT_RATIO, ArrayDataset, CSVDataset, ImageFolder, ImageListDataset, ImageSamples
from hubkit.data.images import load_image
from hubkit.data.transforms import build_transform
from hubkit.errors import DatasetError
from hubkit.hub.manifest import Manifest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _digit_png(digits, index: int, path: Path, mode: str = "L") -> Path:
    """Save digit ``index`` (0..16 grey levels) as a PNG in ``mode`` (L, RGBA or P)."""
    grey = Image.fromarray((digits.images[index] * (255 / 16)).astype(np.uint8), "L")
    image = {"L": grey, "RGBA": grey.convert("RGBA"), "P": grey.convert("P")}[mode]
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _corrupt_jpeg(photos, path: Path) -> Path:
    """A real JPEG cut to a third of its length."""
    data = photos["cat"].read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 3])
    return path


@pytest.fixture
def messy_folder(tmp_path, digits, photos) -> Path:
    """train/ + validation/ class-per-folder with grey/RGBA/palette PNGs, a JPEG, a space in a name,
    a corrupt JPEG, a .txt, a hidden file and an empty class; a README at the root (ignored)."""
    root = tmp_path / "folder"
    _digit_png(digits, 0, root / "train" / "zero" / "digit with spaces.png")
    _digit_png(digits, 10, root / "train" / "zero" / "b.png", "RGBA")
    _digit_png(digits, 1, root / "train" / "one" / "a.png", "P")
    _digit_png(digits, 11, root / "train" / "one" / "nested" / "b.png")
    (root / "train" / "cat").mkdir()
    shutil.copy(photos["cat"], root / "train" / "cat" / "chelsea.jpg")
    _corrupt_jpeg(photos, root / "train" / "cat" / "broken.jpg")
    (root / "train" / "cat" / "notes.txt").write_text("not an image\n")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "empty").mkdir()
    _digit_png(digits, 20, root / "validation" / "zero" / "c.png")
    shutil.copy(photos["espresso"], root / "validation" / "espresso.jpg")  # outside any class: ignored
    (root / "README.md").write_text("a dataset\n")
    return root


MESSY_FOLDER_ISSUES = {
    ("train", "train/cat/broken.jpg", "corrupt or truncated"),
    ("train", "train/cat/notes.txt", "not an image"),
    ("train", "train/cat/.DS_Store", "not an image"),
    ("train", "empty", "class has no usable images"),
}


def _issues(report):
    return {(i.split, i.origin, i.problem) for i in report.issues}


def _matches(found: set, expected: set) -> bool:
    """Every found issue matches exactly one expected (split, origin, problem substring), and vice versa."""
    pairs = [(f, e) for f in found for e in expected if f[:2] == e[:2] and e[2] in f[2]]
    return len(pairs) == len(found) == len(expected)


def test_image_folder_with_split_folders_reports_each_bad_file(messy_folder):
    ds = ImageFolder(messy_folder)
    assert ds.label_list == ["cat", "empty", "one", "zero"]
    assert len(ds.samples("train")) == 8 and len(ds.samples("validate")) == 1 and not ds.has_split("test")
    report = ds.validate()
    assert _matches(_issues(report), MESSY_FOLDER_ISSUES), report.issues
    # the empty class is the dataset's structure (training stops); the rest are files skip_bad_files may drop
    assert {i.origin: i.kind for i in report.issues if i.kind != "file"} == {"empty": "structure"}
    assert report.counts["train"] == {"cat": 1, "empty": 0, "one": 2, "zero": 2}
    assert report.counts["validate"]["zero"] == 1
    for s in ds.samples("train"):  # grey, RGBA, palette and the spaced name all decode to RGB
        if s.origin.endswith((".png", ".jpg")) and "broken" not in s.origin:
            assert load_image(s.source).mode == "RGB"


def test_image_folder_skip_bad_drops_bad_files_and_keeps_them_listed(messy_folder):
    ds = ImageFolder(messy_folder, skip_bad=True)
    assert {(i.origin) for i in ds.skipped} == {"train/cat/broken.jpg", "train/cat/notes.txt", "train/cat/.DS_Store"}
    assert len(ds.samples("train")) == 5
    assert _issues(ds.validate()) == {("train", "empty", "class has no usable images")}


def test_image_folder_flat_layout_is_split_per_class_deterministically(tmp_path, digits):
    root = tmp_path / "flat"
    for i in range(60):
        _digit_png(digits, i, root / str(digits.target[i] % 3) / f"{i:03d}.png")
    ds = ImageFolder(root, seed=1)
    splits = {s: {x.origin for x in ds.samples(s)} for s in ("train", "validate", "test")}
    assert sum(map(len, splits.values())) == 60 and not (splits["train"] & splits["validate"]) and not (splits["train"] & splits["test"])
    for label in range(3):  # stratified: each class split 80/10/10
        per_split = [sum(1 for x in ds.samples(s) if x.label == label) for s in ("train", "validate", "test")]
        total = sum(per_split)
        assert per_split[1] == round(0.1 * total) and per_split[2] == round(0.1 * total)
    assert {x.origin for x in ImageFolder(root, seed=1).samples("test")} == splits["test"]
    assert {x.origin for x in ImageFolder(root, seed=2).samples("test")} != splits["test"]
    assert ds.validate().ok


def test_image_folder_structural_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "only_val" / "val" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no train/ folder"):
        ImageFolder(tmp_path / "only_val")
    report = ImageFolder(tmp_path / "only_val" / "val").validate()  # one class folder, nothing in it
    assert {i.problem for i in report.issues} == {"needs at least 2 classes, found 1", "the train split is empty"}
    assert {i.kind for i in report.issues} == {"structure"}


@pytest.fixture
def list_dataset(tmp_path, digits, photos) -> Path:
    """PaddleHub list files over real digits, with every kind of bad line."""
    base = tmp_path / "lists"
    _digit_png(digits, 0, base / "images" / "zero a.png")
    _digit_png(digits, 1, base / "images" / "one.png", "RGBA")
    _digit_png(digits, 10, base / "images" / "zero b.png", "P")
    _digit_png(digits, 11, base / "images" / "one b.png")
    _digit_png(digits, 20, base / "images" / "zero c.png")
    _corrupt_jpeg(photos, base / "images" / "broken.jpg")
    (base / "images" / "readme.txt").write_text("hello\n")
    (base / "label_list.txt").write_text("zero\none\nseven\n")
    (base / "train_list.txt").write_text(
        "images/zero a.png 0\n"  # 1: a space in the path, integer label
        "images/one.png one\n"  # 2: label by name
        "\n"  # 3: blank, ignored
        "images/zero b.png 0\n"  # 4
        "images/one b.png cat\n"  # 5: unknown label
        "images/missing.png 1\n"  # 6: wrong path
        "justonetoken\n"  # 7: malformed
        "images/broken.jpg 1\n"  # 8: corrupt JPEG
        "images/readme.txt 0\n"  # 9: not an image
        "images/one b.png 9\n")  # 10: index out of range
    (base / "validate_list.txt").write_text("images/zero c.png zero\n")
    return base


LIST_ISSUES = {
    ("train", "train_list.txt:5", "unknown label 'cat'"),
    ("train", "train_list.txt:6", "no such file"),
    ("train", "train_list.txt:7", "malformed line"),
    ("train", "train_list.txt:8", "corrupt or truncated"),
    ("train", "train_list.txt:9", "not an image"),
    ("train", "train_list.txt:10", "unknown label '9'"),
    ("train", "seven", "class has no usable images"),
}


def test_list_files_report_every_bad_line_with_file_and_line(list_dataset):
    ds = ImageListDataset(list_dataset)
    assert ds.label_list == ["zero", "one", "seven"]
    assert [(s.origin, s.label) for s in ds.samples("train")][:3] == [
        ("train_list.txt:1", 0), ("train_list.txt:2", 1), ("train_list.txt:4", 0)]
    assert ds.samples("train")[0].source.endswith("zero a.png")
    assert [s.origin for s in ds.samples("validate")] == ["validate_list.txt:1"] and not ds.has_split("test")
    report = ds.validate()
    assert _matches(_issues(report), LIST_ISSUES), report.issues
    assert report.counts["train"] == {"zero": 2, "one": 1, "seven": 0}
    quick = ds.validate(check_images=False)  # no decoding: the missing file is still found, bad files are not
    assert {i.origin for i in quick.issues} == {"train_list.txt:5", "train_list.txt:6", "train_list.txt:7",
                                                "train_list.txt:10", "seven"}


def test_list_files_skip_bad(list_dataset):
    ds = ImageListDataset(list_dataset, skip_bad=True)
    assert sorted(i.origin for i in ds.skipped) == sorted(o for _, o, _ in LIST_ISSUES if ":" in o)
    assert [s.origin for s in ds.samples("train")] == ["train_list.txt:1", "train_list.txt:2", "train_list.txt:4"]
    assert _issues(ds.validate()) == {("train", "seven", "class has no usable images")}


def test_list_files_missing_required_files_name_them(list_dataset):
    (list_dataset / "label_list.txt").unlink()
    with pytest.raises(DatasetError, match="label_list.txt"):
        ImageListDataset(list_dataset)
    (list_dataset / "label_list.txt").write_text("zero\none\n")
    (list_dataset / "train_list.txt").unlink()
    with pytest.raises(DatasetError, match="train_list.txt"):
        ImageListDataset(list_dataset)


def test_csv_dataset_with_split_column(list_dataset):
    csv = list_dataset / "data.csv"
    csv.write_text("path,label,split\n"
                   "images/zero a.png,zero,train\n"  # line 2
                   "images/one.png,one,train\n"
                   "images/zero b.png,zero,val\n"
                   "images/one b.png,cat,train\n"  # line 5: unknown label
                   "images/zero c.png,zero,holdout\n"  # line 6: unknown split
                   "images/missing.png,one,test\n")  # line 7: wrong path
    ds = CSVDataset(csv, split_column="split")
    assert ds.label_list == ["cat", "one", "zero"]
    ds = CSVDataset(csv, split_column="split", label_list=["zero", "one"])
    assert [s.origin for s in ds.samples("validate")] == ["data.csv:4"]
    assert _matches(_issues(ds.validate()), {("train", "data.csv:5", "unknown label 'cat'"),
                                             ("all", "data.csv:6", "unknown split 'holdout'"),
                                             ("test", "data.csv:7", "no such file")})
    with pytest.raises(DatasetError, match="no column 'file'"):
        CSVDataset(csv, path_column="file")


def test_real_digits_arrays_are_scaled_to_full_range_and_upsampled(digits):
    transform = build_transform(Manifest.from_file(REPO / "modules" / "efficientnet_lite0" / "module.json").preprocessing)
    ds = ArrayDataset(digits.images[:50], digits.target[:50], [str(i) for i in range(10)], value_range=(0, 16))
    auto = ArrayDataset(digits.images[:50], digits.target[:50], [str(i) for i in range(10)])
    for dataset in (ds, auto):
        sample = dataset.samples("train")[0]
        pixels = np.asarray(load_image(sample.source))
        assert pixels.shape == (8, 8, 3) and pixels.min() == 0 and pixels.max() >= 200  # 0..16 mapped onto 0..255
        x, label = ImageSamples([sample], transform)[0]
        assert tuple(x.shape) == (3, 224, 224) and label == sample.label
        assert float(x.min()) < -0.9 and float(x.max()) > 0.5  # black background and bright strokes survive
    assert np.asarray(load_image(np.array([[0.0, 0.5], [1.0, 0.25]])))[..., 0].tolist() == [[0, 128], [255, 64]]
    assert np.asarray(load_image(np.array([[0, 7], [255, 3]], dtype=np.uint8)))[..., 0].tolist() == [[0, 7], [255, 3]]
    assert ds.validate().ok and ds.fingerprint("train") != ds.fingerprint("test")


def test_cli_validate_data_lists_issues_and_exits_1(run_hub, list_dataset, messy_folder):
    proc = run_hub("validate-data", str(list_dataset))
    assert proc.returncode == 1, proc.stderr
    for split, origin, problem in LIST_ISSUES:
        assert any(line.startswith(f"{split}: {origin}: ") and problem in line for line in proc.stdout.splitlines()), origin
    assert "list files, 3 classes" in proc.stdout and "7 issues" in proc.stdout
    table = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.split()}
    assert table["CLASS"] == ["TRAIN", "VALIDATE"] and table["zero"] == ["2", "1"] and table["seven"] == ["0", "0"]

    proc = run_hub("validate-data", str(messy_folder), "--json")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["layout"] == "class-per-folder" and not data["ok"]
    assert _matches({(i["split"], i["origin"], i["problem"]) for i in data["issues"]}, MESSY_FOLDER_ISSUES)


def test_cli_validate_data_clean_dataset_exits_0(run_hub, tmp_path, digits):
    for i in range(12):
        _digit_png(digits, i, tmp_path / "clean" / ("even" if digits.target[i] % 2 == 0 else "odd") / f"{i}.png")
    proc = run_hub("validate-data", str(tmp_path / "clean"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("ok") and "class-per-folder, 2 classes" in proc.stdout
    proc = run_hub("validate-data", str(tmp_path / "nowhere"))
    assert proc.returncode == 2  # click: the path does not exist


def test_list_and_csv_files_that_are_not_text_are_dataset_errors(tmp_path):
    (tmp_path / "label_list.txt").write_bytes(b"cat\n\xff\xfedog\n")
    (tmp_path / "train_list.txt").write_text("a.jpg 0\n")
    with pytest.raises(DatasetError, match="label_list.txt is not UTF-8 text"):
        ImageListDataset(tmp_path)
    (tmp_path / "data.csv").write_bytes(b"path,label\n\x89PNG\r\n\x1a\n")
    with pytest.raises(DatasetError, match="data.csv is not UTF-8 text"):
        CSVDataset(tmp_path / "data.csv")


def test_a_csv_split_column_is_honoured_by_default(list_dataset, run_hub):
    csv = list_dataset / "data.csv"
    csv.write_text("path,label,split\n"
                   "images/zero a.png,zero,train\n"
                   "images/one.png,one,train\n"
                   "images/zero b.png,zero,test\n"
                   "images/one b.png,one,test\n"
                   "images/zero c.png,zero,validate\n")
    ds = CSVDataset(csv)
    assert [s.origin for s in ds.samples("test")] == ["data.csv:4", "data.csv:5"]
    assert len(CSVDataset(csv, split_column=None).samples("train")) >= 4  # ignored: split by ratio
    counts = json.loads(run_hub("validate-data", str(csv), "--json", check=True).stdout)["counts"]
    assert counts["test"] == {"one": 1, "zero": 1} and counts["validate"] == {"one": 0, "zero": 1}
    counts = json.loads(run_hub("validate-data", str(csv), "--json", "--split-column", "", check=True).stdout)["counts"]
    assert sum(counts["train"].values()) >= 4
    csv.write_text(csv.read_text().replace("path,label,split", "path,label,fold"))
    counts = json.loads(run_hub("validate-data", str(csv), "--json", "--split_column", "fold", check=True).stdout)["counts"]
    assert counts["test"] == {"one": 1, "zero": 1}


def test_an_empty_class_folder_outside_train_is_reported_under_its_own_split(tmp_path, photos):
    for folder, photo in (("train/cat", "cat"), ("train/bag", "espresso"), ("val/cat", "cat")):
        (tmp_path / folder).mkdir(parents=True)
        shutil.copy(photos[photo], tmp_path / folder / "a.jpg")
    (tmp_path / "val" / "bag").mkdir()
    assert _issues(ImageFolder(tmp_path).validate()) == {("validate", "val/bag", "class folder is empty")}


def test_every_dataset_splits_by_the_same_default_ratio(digits):
    arrays = ArrayDataset(digits.images[:100], digits.target[:100], [str(i) for i in range(10)])
    assert [len(arrays.samples(s)) for s in ("train", "validate", "test")] == [80, 10, 10]
    assert DEFAULT_SPLIT_RATIO == (0.8, 0.1, 0.1)
