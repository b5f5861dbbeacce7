"""The fast paths change speed, never answers; the registry commands and ``hub --help`` never import torch.

Behavioural tests only: timings live in benchmarks/ (they are meaningless on a shared CI box).
"""
from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CAT_CLASSES, ESPRESSO_CLASS
from PIL import Image

from hubkit import Module
from hubkit.data.images import load_image
from hubkit.data.transforms import PixelPipeline, build_transform
from hubkit.models.factory import create_architecture
from hubkit.models.optimize import fold_batchnorm


def imported_top_level(args: list[str], env: dict | None = None) -> set[str]:
    """Top-level packages a ``python -X importtime -m hubkit.cli ARGS`` process imports."""
    import os

    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hubkit.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HUBKIT_DISABLE_PROGRESS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


@pytest.mark.parametrize("args", [["search", "lite"], ["list"], ["show", "efficientnet_lite0"], ["--help"]], ids=" ".join)
def test_registry_commands_do_not_import_torch(lite0_home, args):
    imported = imported_top_level(args)
    assert "hubkit" in imported and "click" in imported  # the import log was read
    heavy = {"torch", "timm", "torchvision", "safetensors", "PIL", "numpy", "requests", "tqdm", "huggingface_hub"}
    assert not imported & heavy, sorted(imported & heavy)  # requests & co. load on the first download only


@pytest.mark.parametrize("command", ["install efficientnet_lite0", "lock -o {tmp}/hub.lock", "pack -o {tmp}/fleet.tar",
                                     "download efficientnet_lite0 --output_path {tmp}"])
def test_package_commands_on_an_installed_module_do_not_import_torch(lite0_home, tmp_path, command):
    """Reusing, locking, packing or archiving an installed module hashes files: timm's seconds of imports are for
    a conversion only."""
    imported = imported_top_level(command.format(tmp=tmp_path).split())
    assert "hubkit" in imported and "click" in imported
    assert not imported & {"torch", "timm", "torchvision"}, sorted(imported & {"torch", "timm", "torchvision"})


@pytest.fixture(scope="module")
def test_photos(photos):
    """Real photos with confident ImageNet answers: the examples and scikit-image photographs."""
    from skimage import data

    return {"chelsea.jpg": photos["cat"], "coffee.jpg": photos["espresso"], "astronaut": data.astronaut(),
            "rocket": data.rocket(), "skimage cat": data.chelsea(), "skimage coffee": data.coffee()}


@pytest.mark.slow
def test_reduced_precision_and_folded_batchnorm_keep_top1(lite0, test_photos):
    """The reference is timm's model as built, in fp32; every fast path must give its top-1."""
    variants = {"timm fp32": dict(precision="fp32", optimize=False, runtime="torch"),
                "folded fp32": dict(precision="fp32", runtime="torch"), "folded bf16": dict(precision="bf16", runtime="torch"),
                "torch auto": dict(precision="auto", runtime="torch"), "auto": dict(precision="auto")}
    answers = {name: Module(name="efficientnet_lite0", cache=lite0.cache, **kwargs).predict(list(test_photos.values()),
                                                                                           top_k=3)
               for name, kwargs in variants.items()}
    reference = answers["timm fp32"]
    assert reference[0].top_k[0].index in CAT_CLASSES and reference[1].top_k[0].index == ESPRESSO_CLASS
    for variant, predictions in answers.items():
        for photo, ref, got in zip(test_photos, reference, predictions):
            assert got.top_k[0].index == ref.top_k[0].index, (variant, photo, ref.top_k[0], got.top_k[0])
            assert got.top_k[0].probability == pytest.approx(ref.top_k[0].probability, abs=0.05), (variant, photo)
    # folding is exact up to fp32 rounding
    for ref, got in zip(reference, answers["folded fp32"]):
        assert [c.index for c in got.top_k] == [c.index for c in ref.top_k]
        assert [c.probability for c in got.top_k] == pytest.approx([c.probability for c in ref.top_k], abs=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv3_large_100", "regnety_016", "tf_mobilenetv3_small_100"])
def test_batchnorm_folding_keeps_outputs_across_architectures(arch):
    """Plain BatchNorm2d, timm's BatchNormAct2d, squeeze-excite blocks, and timm's Conv2dSame (tf_ padding)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10).eval()
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics far from 0/1
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.weight.data.uniform_(0.5, 1.5)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert norms > 0
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = model(x)
        folded = fold_batchnorm(model, x)
        got = model(x)
    assert folded == norms  # every conv->BN pair
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_inference_model_is_folded_however_it_is_first_built(lite0):
    def norms(model) -> int:
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())

    module = Module(name="efficientnet_lite0", cache=lite0.cache, precision="bf16", runtime="torch")
    module.forward_probabilities(torch.zeros(1, 3, 224, 224))  # built inside inference_mode + bf16 autocast
    assert norms(module.model) == 0
    assert norms(Module(name="efficientnet_lite0", cache=lite0.cache, optimize=False).model) == 49


def test_batchnorm_folding_leaves_the_convolutions_named_in_keep_alone():
    import timm

    model = timm.create_model("resnet18", num_classes=10).eval()
    model.bn1.running_mean.uniform_(-1, 1)
    x = torch.randn(1, 3, 64, 64)
    seen = {}
    model.conv1.register_forward_hook(lambda _m, _i, out: seen.__setitem__("conv1", out))
    with torch.no_grad():
        model(x)
        before = seen["conv1"]
        assert fold_batchnorm(model, x, keep={"conv1"}) == 19  # 20 pairs, conv1's kept
        model(x)
    assert isinstance(model.bn1, torch.nn.BatchNorm2d)
    torch.testing.assert_close(seen["conv1"], before)  # a hook (feature tap, cut point) there sees the same output


class _SharedConvOutput(torch.nn.Module):
    """A conv whose output feeds a BatchNorm *and* a skip connection: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_batchnorm_folding_that_would_change_outputs_is_undone():
    model = _SharedConvOutput().eval()
    model.bn.running_mean.fill_(0.5), model.bn.running_var.fill_(4.0)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert fold_batchnorm(model, x) == 0
        assert isinstance(model.bn, torch.nn.BatchNorm2d)
        torch.testing.assert_close(model(x), expected)
        assert fold_batchnorm(model.train(), x) == 0  # a training model keeps its BatchNorms


def test_batched_normalisation_equals_the_timm_transform(lite0, photos, tmp_path):
    """The fast path (PIL steps per image, ToTensor+Normalize over the batch) is bit-identical, and so
    is what ``Module.preprocess`` (the server's preprocessing) makes of each image."""
    pixels = PixelPipeline.split(lite0.transform)
    assert pixels is not None and pixels.pil_steps
    rgba = tmp_path / "rgba.png"
    Image.open(photos["cat"]).convert("RGBA").resize((180, 333)).save(rgba)
    sources = [photos["cat"], photos["espresso"], rgba, Image.open(photos["espresso"]).convert("L"),
               np.asarray(Image.open(photos["cat"]))[:50, :400]]
    expected = torch.stack([lite0.transform(load_image(s)) for s in sources])
    assert torch.equal(torch.stack([lite0.preprocess(s) for s in sources]), expected)
    for channels_last in (False, True):
        arrays = [np.asarray(functools.reduce(lambda image, step: step(image), pixels.pil_steps, load_image(s)))
                  for s in sources]
        assert all(a.dtype == np.uint8 and a.shape == (224, 224, 3) for a in arrays)
        batch = pixels.normalise(arrays, channels_last=channels_last)
        assert batch.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(batch, expected)


def test_transforms_that_cannot_be_split_fall_back_to_the_full_transform(lite0):
    training = build_transform(lite0.manifest.preprocessing, training=True)
    assert PixelPipeline.split(training) is None
    assert PixelPipeline.split(lambda image: image) is None


def test_model_built_without_random_init_matches_the_ordinary_build(lite0):
    fast = lite0.create_model()
    ordinary = create_architecture(lite0.manifest)
    ordinary.load_state_dict(lite0.state_dict())
    ordinary.eval()
    assert not any(t.is_meta for t in (*fast.parameters(), *fast.buffers()))
    assert not fast.training
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(fast(x), ordinary(x))
    assert fast.state_dict().keys() == ordinary.state_dict().keys()


def test_predict_without_the_split_pipeline_gives_the_same_answers(lite0, photos):
    """The per-image fallback (any transform that cannot be split) predicts exactly like the fast path."""
    fallback = Module(name="efficientnet_lite0", cache=lite0.cache, precision=lite0.precision)
    fallback.transform = lambda image: lite0.transform(image)  # a callable, not timm's Compose: runs image by image
    assert PixelPipeline.split(fallback.transform) is None
    items = [photos["cat"], photos["espresso"], photos["cat"]]
    fast, slow = lite0.predict(items, top_k=3, batch_size=2), fallback.predict(items, top_k=3, batch_size=2)
    assert [[c.index for c in p.top_k] for p in fast] == [[c.index for c in p.top_k] for p in slow]
    assert [c.probability for p in fast for c in p.top_k] == pytest.approx([c.probability for p in slow for c in p.top_k],
                                                                           abs=1e-6)


@pytest.mark.slow
def test_large_jpegs_decode_at_reduced_scale_with_the_same_answers(lite0, photos, tmp_path):
    """A 6.6-megapixel JPEG (an upscaled photo) decodes at 1/4 scale (both sides >= 2 x 256) and is classified alike."""
    big = tmp_path / "big_cat.jpg"
    cat = Image.open(photos["cat"]).convert("RGB")
    cat.resize((cat.width * 7, cat.height * 7), Image.BICUBIC).save(big, quality=92)
    full = load_image(big)
    drafted = load_image(big, draft_size=512)
    assert drafted.size == (-(-full.width // 4), -(-full.height // 4)) and min(drafted.size) >= 512
    assert load_image(photos["cat"], draft_size=512).size == cat.size  # small photos are decoded whole

    exact = Module(name="efficientnet_lite0", cache=lite0.cache, precision="fp32", optimize=False).predict([big], top_k=3)
    fast = Module(name="efficientnet_lite0", cache=lite0.cache, precision="fp32").predict([big], top_k=3)
    assert Module(name="efficientnet_lite0", cache=lite0.cache, runtime="torch", precision="fp32").predict(
        [big], top_k=3)[0].top_k[0].index == exact[0].top_k[0].index  # the torch path decodes it alike
    assert exact[0].top_k[0].index in CAT_CLASSES
    assert [c.index for c in fast[0].top_k] == [c.index for c in exact[0].top_k]
    assert [c.probability for c in fast[0].top_k] == pytest.approx([c.probability for c in exact[0].top_k], abs=0.03)
