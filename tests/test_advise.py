"""`advise` and `hub advise` on real data: LFW faces vs non-faces, clothing photos, real ImageNet weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image

from hubkit.data.datasets import ArrayDataset, CSVDataset
from hubkit.errors import ConfigError, DatasetError
from hubkit.finetune import strategies
from hubkit.finetune.advise import FEATURE_EXTRACTION, FREEZE_FIRST_K, FULL_FINETUNE, Thresholds, advise, recommend

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lfw() -> ArrayDataset:
    """200 real 25x25 images: the first 100 faces, the last 100 non-faces (80/10/10 split)."""
    images = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")
    return ArrayDataset(images, [0] * 100 + [1] * 100, ["face", "non-face"])


def test_lfw_faces_are_small_and_unlike_imagenet(lfw, lite0):
    advice = advise(lfw, lite0, max_per_class=8)
    m = advice.measures
    assert m["num_classes"] == 2 and m["train_images"] == 160 and m["sampled_images"] == 16
    assert m["chance_accuracy"] == 0.5 and 0.75 <= m["probe_accuracy"] <= 1.0  # faces vs non-faces separate well
    assert 0.0 < m["imagenet_confidence"] < 0.3  # ...but 25x25 grey faces mean little to the ImageNet head
    assert m["middle_tap"] == "stage2" and abs(m["top_gain"]) < 0.2  # and the top layers add nothing over the middle
    assert advice.regime == "small-different"
    assert (advice.strategy, advice.kwargs) == (FREEZE_FIRST_K, {"until": "stage2"})
    assert "80 images per class" in advice.explanation and "different from" in advice.explanation
    assert json.loads(json.dumps(advice.to_dict()))["thresholds"]["small_per_class"] == 100

    taps = [t.name for t in lite0.manifest.features.taps]
    lenient = recommend(m, taps, Thresholds(small_per_class=50, similar_confidence=0.0, similar_top_gain=-1.0))
    assert (lenient.regime, lenient.strategy, lenient.kwargs) == ("large-similar", FREEZE_FIRST_K, {"until": "stage3"})
    strict = recommend(m, taps, Thresholds(small_per_class=50))
    assert (strict.regime, strict.strategy, strict.kwargs) == ("large-different", FULL_FINETUNE, {})
    frozen = recommend(m, taps, Thresholds(similar_confidence=0.0, similar_top_gain=-1.0))
    assert (frozen.strategy, frozen.kwargs) == (FEATURE_EXTRACTION, {"head": "gap_linear"})  # "a linear head", said and done
    for a in (advice, lenient, strict, frozen):  # every recommendation is a strategy the fine-tuning API accepts as given
        assert getattr(strategies, a.strategy)(**a.kwargs).name in ("frozen", "freeze_k", "finetune")
    assert [a.command("lite0", "my data/") for a in (advice, strict, frozen)] == [
        "hub finetune lite0 --dataset 'my data/' --strategy freeze_k --freeze-until stage2",
        "hub finetune lite0 --dataset 'my data/' --strategy finetune",
        "hub finetune lite0 --dataset 'my data/' --strategy frozen --head gap_linear"]


def test_advise_refuses_what_it_cannot_measure(lfw, lite0):
    with pytest.raises(ConfigError, match="max_per_class"):
        advise(lfw, lite0, max_per_class=1)
    one_class = ArrayDataset(np.zeros((4, 8, 8)), [0, 0, 0, 0], ["only"])
    with pytest.raises(DatasetError, match="at least 2 classes"):
        advise(one_class, lite0)
    one_each = ArrayDataset(lfw.samples("train")[0].source[None].repeat(2, 0), [0, 1], ["a", "b"], splits={"train": [0, 1]})
    with pytest.raises(DatasetError, match="too few readable train images"):
        advise(one_each, lite0)


def test_clothing_subset_of_10_per_class_gets_a_frozen_extractor(shared_data, lite0, tmp_path):
    root = shared_data / "clothing-small" / "train"
    rows = [f"{p.relative_to(root).as_posix()},{c.name}" for c in sorted(root.iterdir()) if c.is_dir()
            for p in sorted(c.iterdir())[:10]]
    (tmp_path / "subset.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    dataset = CSVDataset(tmp_path / "subset.csv", base_path=root, split_ratio=(1, 0, 0))
    advice = advise(dataset, lite0, max_per_class=5)
    m = advice.measures
    assert m["num_classes"] == 10 and m["images_per_class"] == 10 and m["sampled_images"] == 50
    assert m["probe_accuracy"] >= 0.4 and m["imagenet_confidence"] >= 0.3 and m["top_gain"] >= 0.1, m
    assert (advice.regime, advice.strategy, advice.kwargs) == ("small-similar", FEATURE_EXTRACTION, {"head": "gap_linear"})


def test_cli_advise_prints_recommendation_and_numbers(run_hub, lite0_home, tmp_path):
    images = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")
    for i in list(range(6)) + list(range(100, 106)):
        folder = tmp_path / "lfw" / ("face" if i < 100 else "non-face")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((images[i] * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    proc = run_hub("advise", str(tmp_path / "lfw"), "--module", "efficientnet_lite0", "--max-per-class", "4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"recommended: {FREEZE_FIRST_K}(until='stage2')  [small-different]"), proc.stdout
    assert lines[1] == f"run:         hub finetune efficientnet_lite0 --dataset {tmp_path / 'lfw'} --strategy freeze_k --freeze-until stage2"
    numbers = {line.split()[0]: line.split()[1] for line in lines[1:] if line.startswith("  ")}
    assert numbers["sampled_images"] == "8" and numbers["images_per_class"] == "4.0"
    assert 0.5 <= float(numbers["probe_accuracy"]) <= 1 and 0 < float(numbers["imagenet_confidence"]) < 0.3
    assert "Recommendation: freeze the first blocks" in " ".join(lines)

    proc = run_hub("advise", str(tmp_path / "lfw"), "--module", "efficientnet_lite0", "--max-per-class", "1")
    assert proc.returncode == 2 and "max-per-class" in proc.stderr


def test_backbones_are_ranked_by_a_cross_validated_probe_with_their_cost(run_hub, lite0_home, lfw_folder,
                                                                          stage1_module_folder):
    """efficientnet_lite0 against its own first stage exported as a module (fewer parameters, faster, weak
    features): the ranking, the probe's chosen C and the real parameter counts, then the advice for the best."""
    from hubkit import Module

    lite0 = Module(name="efficientnet_lite0", device="cpu")
    run_hub("install", str(stage1_module_folder), check=True)

    proc = run_hub("advise", str(lfw_folder), "--backbones", "lite0_stage1, efficientnet_lite0", "--max-per-class", "12",
                   "--device", "cpu", "--json", check=True)
    result = json.loads(proc.stdout)
    ranking = result["backbones"]
    assert [r["module"] for r in ranking] == ["efficientnet_lite0==1.0.0", "lite0_stage1==1.0.0"], ranking
    assert ranking[0]["probe_accuracy"] >= ranking[1]["probe_accuracy"] >= 0.5
    assert ranking[0]["params"] == sum(p.numel() for p in lite0.model.parameters()) > ranking[1]["params"]
    assert ranking[1]["images_per_second"] > ranking[0]["images_per_second"] > 0
    assert all(1e-5 <= r["probe_C"] <= 10 for r in ranking)
    assert result["module"] == "efficientnet_lite0" and result["command"].startswith("hub finetune efficientnet_lite0 ")

    text = run_hub("advise", str(lfw_folder), "--backbones", "efficientnet_lite0,lite0_stage1", "--max-per-class", "12",
                   "--device", "cpu", check=True).stdout.splitlines()
    assert text[0].split() == ["rank", "backbone", "probe", "CV", "acc", "C", "params", "img/s", "here", "seconds"]
    assert text[2].split()[:2] == ["1", "efficientnet_lite0==1.0.0"] and text[5].startswith("recommended: ")
    both = run_hub("advise", str(lfw_folder), "--module", "efficientnet_lite0", "--backbones", "lite0_stage1")
    assert both.returncode == 2 and "not both" in both.stderr
