"""Training augmentation on real images: an image's random crop/flip/jitter is a function of
(seed, epoch, index) only (across dataset instances, DataLoader workers, global RNG state),
a frozen backbone trains on augmented images, and a resumed augmented run ends bit-identical."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import skimage
import torch
from torch.utils.data import DataLoader

import hubkit as hub
from hubkit.data.augment import AugmentedSamples, augment_options
from hubkit.data.datasets import ArrayDataset, ImageSamples
from hubkit.data.transforms import build_transform
from hubkit.errors import ConfigError
from hubkit.finetune import ImageClassifierTask, RunConfig
from hubkit.hub.manifest import Preprocessing

PRE = Preprocessing((3, 32, 32), "bicubic", 0.875, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def faces() -> ArrayDataset:
    """scikit-image's 200 25x25 crops: 100 faces then 100 non-faces, split 70/15/15."""
    images = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")
    return ArrayDataset((images * 255).astype(np.uint8), [0] * 100 + [1] * 100, ["face", "non_face"], seed=0,
                        split_ratio=(0.7, 0.15, 0.15))  # the step counts below are written for 140 training images


def augmented(faces, *, seed: int = 3, epoch: int = 1, preset: str = "strong") -> AugmentedSamples:
    """A fresh dataset instance with a freshly built timm training transform."""
    transform = build_transform(PRE, training=True, augment=augment_options(preset))
    return AugmentedSamples(faces.samples("train"), transform, seed=seed, epoch=epoch)


def stacked(dataset, indices) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in indices])


def test_an_images_augmentation_depends_only_on_seed_epoch_and_index(faces):
    indices = list(range(24))
    reference = stacked(augmented(faces), indices)

    # another instance, read in another order after the global generators moved on: the same tensors,
    # and the global generators are left as they were
    torch.manual_seed(12345), random.seed(12345), np.random.seed(12345)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    again = augmented(faces)
    assert torch.equal(stacked(again, indices[::-1]).flip(0), reference)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])

    # decoded in a shuffled batch order in the main process and by two DataLoader worker processes: the same
    order = torch.randperm(len(indices)).tolist()
    batches = [order[i:i + 5] for i in range(0, len(order), 5)]
    for workers in (0, 2):
        images = torch.cat([x for x, _ in DataLoader(again, batch_sampler=batches, num_workers=workers)])
        assert torch.equal(images, reference[order]), f"num_workers={workers}"

    # and it is random: another epoch or seed draws other crops, and none equals the eval transform's image
    for other in (augmented(faces, epoch=2), augmented(faces, seed=4)):
        assert sum(not torch.equal(a, b) for a, b in zip(stacked(other, indices), reference)) >= 20
    plain = stacked(ImageSamples(faces.samples("train"), build_transform(PRE)), indices)
    assert plain.shape == reference.shape
    assert sum(not torch.equal(a, b) for a, b in zip(plain, reference)) >= 20


def test_augment_settings_are_checked_and_enter_the_configuration_hash(lite0, faces, tmp_path):
    for bad in ("medium", {"scale": (0.5, 2.0)}, {"hflip": 1.5}, {"rotate": 10}, {"color_jitter": -1}, 3):
        with pytest.raises(ConfigError, match="augment"):
            RunConfig(augment=bad)
    assert augment_options({"hflip": 0.0})["scale"] == (0.5, 1.0)  # unspecified options from "light"
    # without augmentation the hashed fields are what they were before the option existed (old checkpoints resume)
    assert "augment" not in RunConfig().hashed() and RunConfig(augment="light").hashed()["augment"] == "light"

    def task(augment, head="fc"):
        cfg = RunConfig(input_size=32, augment=augment, checkpoint_dir=tmp_path / "ckpt", progress=False)
        return ImageClassifierTask(lite0, faces, config=cfg, strategy=hub.FeatureExtractionStrategy(head=head))

    hashes = {str(a): task(a).config_hash() for a in (None, "light", "strong", {"hflip": 0.0})}
    assert len(set(hashes.values())) == 4, hashes
    with pytest.raises(ConfigError, match="svm head is fitted once"):
        task("light", head=hub.SVMHead(Cs=(1.0,), folds=2))


@pytest.mark.slow
def test_frozen_backbone_trains_on_augmented_images_and_resumes_exactly(lite0_home, faces, tmp_path):
    """Two DataLoader workers decode the images: were the draws taken from the workers' generators,
    the resumed run (whose batches land on other workers) would train on other crops."""
    module = hub.Module(name="efficientnet_lite0")

    def run(directory: str, **overrides):
        settings = dict(num_epoch=2, batch_size=70, learning_rate=3e-2, input_size=16, augment="light", num_workers=2,
                        eval_interval=1000, save_ckpt_interval=1000, checkpoint_dir=tmp_path / directory,
                        precision="fp32", progress=False, seed=5)
        task = ImageClassifierTask(module, faces, config=RunConfig(**{**settings, **overrides}),
                                   strategy=hub.FeatureExtractionStrategy(head="fc"))
        return task, task.finetune_and_eval()

    straight, result = run("straight")
    assert result.steps == 4 and result.epochs == 2  # 140 training images, batches of 70
    assert result.best_score > 0.7, result  # chance is 0.5
    assert "train" not in straight.splits.features  # the train split went through the backbone each epoch
    assert sum(straight.feature_stats.values()) == 2  # validate and test only

    _, partial = run("resumed", max_steps=3)  # stops in the second epoch, after its first batch
    assert partial.steps == 3
    resumed, result_resumed = run("resumed")
    assert result_resumed.resumed_from_step == 3 and result_resumed.steps == 4
    assert resumed.feature_stats == {"computed": 0, "cached": 2}
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert result_resumed.best_score == result.best_score
    assert [e["acc"] for e in result_resumed.history["eval"]] == [e["acc"] for e in result.history["eval"]]

