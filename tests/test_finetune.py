"""The fine-tuning API on real data: learning happens, each strategy changes what it should,
heads, metrics, reports, bad data, export -> hub install -> hub run -> fine-tune again."""
from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage
import timm
import torch
from conftest import DIGITS_SPLIT
from PIL import Image
from safetensors.torch import save_file
from timm.models import group_parameters

import hubkit as hub
from hubkit.cli.finetune import STRATEGY_NAMES
from hubkit.constants import DEFAULT_CPU_RUNTIME
from hubkit.data.datasets import ArrayDataset, ImageSamples
from hubkit.errors import CheckpointError, ConfigError, DatasetError, HubkitWarning, WeightsError
from hubkit.finetune import (
    CheckpointStore,
    ClassifierModel,
    FCHead,
    ImageClassifierTask,
    RunConfig,
    classification_metrics,
    make_strategy,
)
from hubkit.finetune import diagnosis as diagnosis_module
from hubkit.finetune.metrics import check_metric_names
from hubkit.finetune.reporting import report_html
from hubkit.finetune.strategies import layer_groups, schedule_factor
from hubkit.hub.cache import Cache
from hubkit.inference.compiled import open_compiled

# --- real data ---------------------------------------------------------------------------------
#: The split the step counts below are written for (7 batches of 32 digits per epoch): the `digits` fixture's.
SPLIT = DIGITS_SPLIT


@pytest.fixture(scope="session")
def lfw() -> ArrayDataset:
    """scikit-image's 200 25x25 crops: 100 faces then 100 non-faces."""
    images = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")
    return ArrayDataset((images * 255).astype(np.uint8), [0] * 100 + [1] * 100, ["face", "non_face"], seed=0,
                        split_ratio=SPLIT)


def config(tmp_path, **kwargs) -> RunConfig:
    base = dict(num_epoch=1, batch_size=32, learning_rate=1e-3, input_size=32, progress=False, eval_interval=1000,
                save_ckpt_interval=1000, checkpoint_dir=tmp_path / "ckpt", precision="fp32")
    base.update(kwargs)
    return RunConfig(**base)


def backbone_state(task) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.model.backbone.state_dict().items()}


def changed(before, after, names) -> list[str]:
    return [n for n in names if not torch.equal(before[n], after[n])]


# --- learning happens ------------------------------------------------------------------------------
@pytest.mark.slow
def test_frozen_features_learn_digits_beat_scratch_and_are_computed_once(lite0_home, digits, tmp_path):
    module = hub.Module(name="efficientnet_lite0")
    settings = dict(num_epoch=2, learning_rate=1e-2, eval_interval=5, log_interval=3)
    task = ImageClassifierTask(module, digits, config=config(tmp_path / "a", **settings),
                               strategy=hub.FeatureExtractionStrategy(head="fc"))
    result = task.finetune_and_eval()
    assert task.feature_stats == {"computed": 3, "cached": 0}
    assert result.metric == "acc" and result.best_score > 0.5, result  # chance is 0.1
    assert result.metrics["acc"] == pytest.approx(result.best_score)
    assert task.evaluate("test")["acc"] > 0.4

    # periodic evaluations (every 5 steps and at each epoch end) and the best model kept
    ckpt = tmp_path / "a" / "ckpt"
    history = json.loads((ckpt / "metrics.json").read_text())["history"]
    assert [e["step"] for e in history["eval"]] == [5, 7, 10, 14]  # 7 batches per epoch
    assert max(e["acc"] for e in history["eval"]) == pytest.approx(result.best_score)
    assert json.loads((ckpt / "best").read_text())["step"] == result.best_step
    assert history["train"][0]["loss"] > history["train"][-1]["loss"]
    assert (ckpt / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((ckpt / "tensorboard").glob("events.out.tfevents.*"))
    check_diagnosis(task, digits, ckpt)

    # the frozen backbone is the module's own weights: checkpoints hold the head alone, and a new task
    # on the same checkpoint directory rebuilds the trained model from them
    assert set(CheckpointStore(ckpt).load("best")["model"]) == {f"head.{k}" for k in task.model.head.state_dict()}
    reloaded = ImageClassifierTask(module, digits, config=config(tmp_path / "a", **settings),
                                   strategy=hub.FeatureExtractionStrategy(head="fc"))
    assert reloaded.evaluate("test") == task.evaluate("test")

    # a second run on the same data and module reuses the cached features (another process would too)
    again = ImageClassifierTask(module, digits, config=config(tmp_path / "b", max_steps=1),
                                strategy=hub.FeatureExtractionStrategy(head="gap_linear"))
    again.finetune_and_eval()
    assert again.feature_stats == {"computed": 0, "cached": 3}
    assert len(list((lite0_home / "features").glob("*.safetensors"))) == 3

    # the same architecture from random weights, same data, same epochs: far behind
    scratch = ImageClassifierTask(module, digits, config=config(tmp_path / "c", **settings),
                                  strategy=hub.FromScratch(head="fc"))
    scratch_result = scratch.finetune_and_eval()
    assert result.best_score > scratch_result.best_score + 0.15, (result.best_score, scratch_result.best_score)


def check_diagnosis(task: ImageClassifierTask, data: ArrayDataset, ckpt: Path) -> None:
    """Why the trained model errs, as the run left it in ``ckpt``: the confused pairs are the largest off-diagonal
    cells of the test confusion matrix, the top losses are the test images the model itself scores worst, and
    both grids decode at one tile per image."""
    summary = json.loads((ckpt / "metrics.json").read_text())
    diagnosis, matrix = summary["diagnosis"], np.array(summary["test_metrics"]["confusion_matrix"])
    assert diagnosis["split"] == "test"  # the split scored last, by the chosen model
    names = task.labels
    cells = sorted(((-matrix[t, p], t, p) for t in range(len(names)) for p in range(len(names)) if t != p and matrix[t, p]))
    expected = [{"true": names[t], "predicted": names[p], "count": -count, "share": pytest.approx(-count / matrix[t].sum())}
                for count, t, p in cells[:diagnosis_module.MAX_PAIRS]]
    assert expected and diagnosis["confused_pairs"] == expected

    # every test image through the trained model, as a user predicts: its loss is -log p(true class)
    samples = data.samples("test")
    predictions = task.predict([s.source for s in samples], top_k=len(names))
    loss = {s.origin: -math.log({c.index: c.probability for c in p.top_k}[s.label]) for s, p in zip(samples, predictions)}
    top = diagnosis["top_losses"]
    assert len(top) == min(diagnosis_module.MAX_IMAGES, len(samples))
    assert [row["loss"] for row in top] == pytest.approx(sorted(loss.values(), reverse=True)[:len(top)], rel=1e-3, abs=1e-4)
    assert [row["loss"] for row in top] == pytest.approx([loss[row["image"]] for row in top], rel=1e-3, abs=1e-4)
    first = predictions[[s.origin for s in samples].index(top[0]["image"])].top_k[0]
    assert (top[0]["predicted"], top[0]["probability"]) == (first.label, pytest.approx(first.probability, abs=1e-4))

    # the grids: one tile per image, four to a row; the heat maps (at 32 px: the deepest tap with a 4x4 map) change them
    assert diagnosis["gradcam"] == {"layer": "blocks.2", "file": "gradcam.png"}
    grid, heat = (np.asarray(Image.open(ckpt / name).convert("RGB"), dtype=np.int16) for name in ("top_losses.png", "gradcam.png"))
    columns = min(diagnosis_module.COLUMNS, len(top))
    size = (math.ceil(len(top) / columns) * (diagnosis_module.CAPTION + diagnosis_module.TILE), columns * diagnosis_module.TILE, 3)
    assert grid.shape == heat.shape == size
    assert np.abs(grid - heat).mean() > 10  # a colour map over every image

    # report.html embeds both, and lists the pairs
    page = (ckpt / "report.html").read_text()
    for element, name in (("top-losses", "top_losses.png"), ("gradcam", "gradcam.png")):
        embedded = re.search(rf'<img id="{element}"[^>]* src="data:image/png;base64,([^"]+)"', page).group(1)
        assert base64.b64decode(embedded) == (ckpt / name).read_bytes()
    table = re.search(r'<table id="confused">.*?</table>', page).group(0)
    assert [int(n) for n in re.findall(r"<td>(\d+)</td>", table)] == [p["count"] for p in expected]


@pytest.mark.slow
def test_svm_head_separates_faces_from_non_faces(lite0, lfw, tmp_path):
    head = hub.SVMHead(Cs=(0.01, 0.1, 1.0), folds=3)
    task = ImageClassifierTask(lite0, lfw, config=config(tmp_path), strategy=hub.FeatureExtractionStrategy(head=head))
    result = task.finetune_and_eval()
    assert head.best_C in (0.01, 0.1, 1.0) and head.cv_score > 0.75
    assert result.metrics["acc"] > 0.75 and task.evaluate("test")["acc"] > 0.75  # chance is 0.5
    # the SVM became a linear layer: predictions on images agree with the evaluation on features
    images = [s.source for s in lfw.samples("test")]
    predicted = [p.top_k[0].index for p in task.predict(images)]
    truth = [s.label for s in lfw.samples("test")]
    assert np.mean(np.equal(predicted, truth)) == pytest.approx(task.evaluate("test")["acc"], abs=0.05)


# --- each strategy changes what it should ------------------------------------------------------------
@pytest.mark.slow
def test_strategies_freeze_and_train_the_right_parameters(lite0, lfw, tmp_path):
    frozen = ImageClassifierTask(lite0, lfw, config=config(tmp_path / "f", max_steps=3),
                                 strategy=hub.FeatureExtractionStrategy(head="fc"))
    before, head_before = backbone_state(frozen), [p.detach().clone() for p in frozen.model.head.parameters()]
    frozen.finetune_and_eval()
    after = backbone_state(frozen)
    assert not changed(before, after, before), "the frozen backbone moved"
    assert any(not torch.equal(a, b) for a, b in zip(head_before, frozen.model.head.parameters()))

    k = hub.FreezeFirstK(2, head="gap_linear")
    task = ImageClassifierTask(lite0, lfw, config=config(tmp_path / "k", max_steps=2, learning_rate=1e-2, batch_size=16), strategy=k)
    before = backbone_state(task)
    task.finetune_and_eval()
    after = backbone_state(task)
    assert k.frozen_groups == ["stem", "blocks.0", "blocks.1"]
    frozen_names = [n for n in before if n.startswith(("conv_stem", "bn1", "blocks.0.", "blocks.1."))]
    trained_names = [n for n in before if n.startswith(("blocks.5.", "blocks.6.", "conv_head"))]
    assert frozen_names and not changed(before, after, frozen_names)  # weights and BN running stats
    assert len(changed(before, after, trained_names)) == len(trained_names)

    by_name = hub.FreezeFirstK(until="stage2", head="gap_linear")  # the manifest's tap stage2 is blocks.2
    ImageClassifierTask(lite0, lfw, config=config(tmp_path / "u", max_steps=0), strategy=by_name)
    assert by_name.frozen_groups == ["stem", "blocks.0", "blocks.1", "blocks.2"]


@pytest.mark.slow
def test_l2_sp_penalty_pulls_towards_pretrained_weights(lite0, lfw, tmp_path):
    def distance(l2_sp: float) -> tuple[float, object]:
        strategy = hub.FullFineTune("gap_linear", backbone_lr_mult=1.0, l2_sp=l2_sp)
        task = ImageClassifierTask(lite0, lfw, config=config(tmp_path / str(l2_sp), max_steps=3, learning_rate=3e-3,
                                                             optimizer="sgd", batch_size=16, input_size=16), strategy=strategy)
        pretrained = {k: v.detach().clone() for k, v in task.model.backbone.named_parameters()}
        task.finetune_and_eval()
        task.model.backbone.train()
        penalty = strategy.penalty(task.model)
        d = sum(float((p.detach() - pretrained[n]).pow(2).sum()) for n, p in task.model.backbone.named_parameters())
        return d, penalty

    free, no_penalty = distance(0.0)
    pulled, penalty = distance(50.0)
    assert no_penalty is None
    assert float(penalty.detach()) > 0
    assert 0 < pulled < 0.8 * free, (pulled, free)


@pytest.mark.slow
def test_ulmfit_unfreezes_gradually_from_the_top(lite0, lfw, tmp_path):
    strategy = hub.ULMFiT("gap_linear", decay=2.6, unfreeze_every=1)
    task = ImageClassifierTask(lite0, lfw, config=config(tmp_path, num_epoch=2, batch_size=64, learning_rate=1e-2),
                               strategy=strategy)
    groups = layer_groups(task.model.backbone)
    optimizer_lrs = [g["lr"] for g in strategy.param_groups(task.model, 1.0)]
    assert optimizer_lrs == sorted(optimizer_lrs) and optimizer_lrs[-1] == 1.0  # discriminative: lower layers slower
    before = backbone_state(task)
    task.finetune_and_eval()
    # the weights at the end of epoch 1 (task.model now holds the best checkpoint's, which may be epoch 0's)
    last = CheckpointStore(tmp_path / "ckpt").load("last")["model"]
    after = {k[len("backbone."):]: v for k, v in last.items() if k.startswith("backbone.")}
    assert strategy.state_dict()["unfrozen"] == 1  # epoch 0: head only; epoch 1: + the top group
    (stem, stem_names), (below_top, below_names), (top, top_names) = groups[0], groups[-2], groups[-1]
    assert (stem, below_top, top) == ("stem", "blocks.5", "blocks.6+conv_head+bn2")
    assert changed(before, after, top_names) and not changed(before, after, stem_names + below_names)


@pytest.mark.parametrize("architecture", ["efficientnet_lite0", "vit_tiny_patch16_224", "convnext_atto"])
def test_layer_groups_are_timms_and_see_through_an_exported_classifier(architecture):
    backbone = timm.create_model(architecture, pretrained=False, num_classes=0)
    groups = layer_groups(backbone)
    timm_groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    assert [names for _, names in groups] == [timm_groups[k] for k in sorted(timm_groups)]
    assert groups[0][0] == "stem" and groups[1][0] in ("blocks.0", "stages.0")
    nested = ClassifierModel(ClassifierModel(backbone, torch.nn.Linear(backbone.num_features, 3)), torch.nn.Identity())
    assert layer_groups(nested) == [(name, ["backbone.backbone." + n for n in names]) for name, names in groups]


def test_schedules_have_their_shape():
    one = schedule_factor("onecycle", 100)
    assert one(0) == pytest.approx(0.04) and one(30) == pytest.approx(1.0) and one(100) < 1e-3
    slanted = schedule_factor("slanted_triangular", 100, cut_frac=0.1, ratio=32)
    assert slanted(0) == pytest.approx(1 / 32) and slanted(10) == pytest.approx(1.0) and slanted(100) == pytest.approx(1 / 32)
    with pytest.raises(ConfigError):
        schedule_factor("linear", 10)


def test_frozen_features_cut_at_a_convolution_are_the_unfolded_backbones(lite0, lfw, tmp_path):
    lite0 = hub.Module(name="efficientnet_lite0", cache=lite0.cache, runtime="torch")  # torch's folded copy
    strategy = hub.FeatureExtractionStrategy("fc", cut_at="conv_head")  # a conv with a BatchNorm after it
    task = ImageClassifierTask(lite0, lfw, config=config(tmp_path), strategy=strategy)
    images = torch.stack([ImageSamples(lfw.samples("train"), task.transform)[i][0] for i in range(4)])
    task.model.eval()
    with torch.no_grad():
        expected = task.model.forward_features(images)
    torch.testing.assert_close(task.frozen_backbone(images), expected, rtol=1e-4, atol=1e-4)
    extractor = task.frozen_backbone.model
    assert [n for n, m in extractor.named_modules() if isinstance(m, torch.nn.BatchNorm2d)] == ["backbone.bn2"]

    # a cut inside a folded BatchNormAct2d still resolves
    inside = ImageClassifierTask(lite0, lfw, config=config(tmp_path / "act"),
                                 strategy=hub.FeatureExtractionStrategy("fc", cut_at="bn2.act"))
    inside.model.eval()
    with torch.no_grad():
        expected = inside.model.forward_features(images)
    torch.testing.assert_close(inside.frozen_backbone(images), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_frozen_features_run_on_the_compiled_runtime_and_equal_torchs(lite0_home, lfw, tmp_path, monkeypatch, caplog):
    module = hub.Module(name="efficientnet_lite0")  # runtime "auto": the compiled one on a CPU
    converted = lambda: {key for key in Cache().get("efficientnet_lite0").record["compiled"] if ":features-" in key}  # noqa: E731
    before = converted()  # what other tests sharing the install made
    images = None
    for cut in (None, "conv_head"):
        task = ImageClassifierTask(module, lfw, config=config(tmp_path / str(cut)),
                                   strategy=hub.FeatureExtractionStrategy("fc", cut_at=cut))
        assert task.frozen_backbone.runtime == DEFAULT_CPU_RUNTIME and task.frozen_backbone.model is None
        if images is None:
            images = torch.stack([ImageSamples(lfw.samples("train"), task.transform)[i][0] for i in range(4)])
        task.model.eval()
        with torch.no_grad():
            expected = task.model.forward_features(images)
        torch.testing.assert_close(task.frozen_backbone(images), expected, rtol=1e-4, atol=1e-4)

    # each (size, cut, weights) is converted once, kept in the snapshot and hashed like the weights
    after = converted()  # one artefact per cut: new, or made by an earlier test in the shared install
    assert len(after) >= 2 and len(after - before) <= 2 and all(r.ok for r in Cache().verify())
    again = ImageClassifierTask(module, lfw, config=config(tmp_path / "again"), strategy=hub.FeatureExtractionStrategy("fc"))
    assert again.frozen_backbone.runtime == DEFAULT_CPU_RUNTIME
    assert converted() == after  # the same (size, cut, weights) is never converted twice

    # a backbone the exporter refuses computes its features with torch, after a one-line notice
    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::made_up' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with caplog.at_level(logging.WARNING, logger="hubkit"):
        refused = ImageClassifierTask(module, lfw, config=config(tmp_path / "refused"),
                                      strategy=hub.FeatureExtractionStrategy("fc", cut_at="blocks.2"))
        assert refused.frozen_backbone.runtime == "torch"
    notices = [r.getMessage() for r in caplog.records if "does not convert" in r.getMessage()]
    assert len(notices) == 1 and "aten::made_up" in notices[0] and "\n" not in notices[0]
    refused.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(refused.frozen_backbone(images), refused.model.forward_features(images),
                                   rtol=1e-4, atol=1e-4)


def test_cut_backbone_and_custom_weights_by_name(lite0, lfw, tmp_path):
    task = ImageClassifierTask(lite0, lfw, config=config(tmp_path), strategy=hub.FullFineTune("fc", cut_at="stage2"))
    assert task.model.cut_at == "blocks.2" and task.in_features == 40
    assert task.model.forward_features(torch.zeros(2, 3, 32, 32)).shape == (2, 40)

    custom = {"conv_stem.weight": torch.full(task.model.backbone.conv_stem.weight.shape, 0.5)}
    save_file(custom, str(tmp_path / "custom.safetensors"))
    with pytest.warns(HubkitWarning, match=r"custom.safetensors: loaded 1 of \d+ tensors \(\d+ missing: bn1.weight, "):
        loaded = ImageClassifierTask(lite0, lfw, config=config(tmp_path),
                                     strategy=hub.FullFineTune("fc", weights=tmp_path / "custom.safetensors"))
    assert torch.equal(loaded.model.backbone.conv_stem.weight, custom["conv_stem.weight"])
    save_file({"stem.conv.weight": custom["conv_stem.weight"]}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="no tensor name matches"):
        ImageClassifierTask(lite0, lfw, config=config(tmp_path), strategy=hub.FullFineTune("fc", weights=tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="stage9"):
        ImageClassifierTask(lite0, lfw, config=config(tmp_path), strategy=hub.FullFineTune("fc", cut_at="stage9"))


class DetachedHead(torch.nn.Module):
    """A head autograd cannot go back through (it cuts the graph, as one computed outside torch would)."""

    def __init__(self, in_features: int, classes: int):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.detach())


def test_grad_cam_maps_the_image_or_says_why_it_cannot(lite0, tmp_path):
    backbone = lite0.context(trainable=True).backbone
    images, targets = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 0])
    # through a linear head, and through a backbone cut at the layer looked at: a map per image, each scaled to a
    # peak of 1 (or all 0, where no part of the image speaks for the class)
    for model in (ClassifierModel(backbone, torch.nn.Linear(1280, 2)), ClassifierModel(backbone, torch.nn.Linear(40, 2), "blocks.2")):
        heat, note = diagnosis_module.gradcam(model, backbone.get_submodule("blocks.2"), images, targets)
        assert note is None and heat.shape == (3, 32, 32) and heat.min() >= 0
        assert set(np.round(heat.max(axis=(1, 2)), 5)) <= {0, 1} and heat.max() == pytest.approx(1)
    heat, note = diagnosis_module.gradcam(ClassifierModel(backbone, DetachedHead(1280, 2)), backbone.get_submodule("blocks.2"),
                                          images, targets)
    assert heat is None and note.startswith("the model cannot be back-propagated to the layer")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    heat, note = diagnosis_module.gradcam(ClassifierModel(vit, torch.nn.Linear(192, 2)), vit.blocks[-1], images, targets)
    assert heat is None and note.startswith("the layer's output is not a map of the image")  # a transformer's tokens
    # the report says why, in place of the heat maps
    png = Image.new("RGB", (4, 4)).tobytes()
    summary = {"diagnosis": {"split": "test", "confused_pairs": [], "top_losses": [], "top_losses_file": "top_losses.png",
                             "gradcam": {"layer": "blocks.11", "file": None, "skipped": note}}}
    page = report_html(summary, png, tmp_path, {"top_losses.png": png})
    assert html.escape(note) in page and 'id="gradcam"' not in page and 'id="top-losses"' in page


# --- metrics ---------------------------------------------------------------------------------------
def test_metrics_on_a_known_case():
    m = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], ["a", "b", "c"])
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "support": 2}
    assert m["precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    with pytest.raises(ConfigError, match="auc"):
        check_metric_names(["auc"])


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_scikit_learn_including_classes_never_predicted_or_absent(seed):
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: PLC0415 (slow import)

    rng = np.random.default_rng(seed)
    labels = [f"c{i}" for i in range(6)]
    y_true = rng.integers(0, 5, 80)  # class c5 never occurs
    y_pred = np.where(rng.random(80) < 0.6, y_true, rng.integers(0, 4, 80))  # wrong guesses fall in c0-c3: c5 is never predicted
    m = classification_metrics(y_true, y_pred, labels)
    index = list(range(6))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=index, average="macro", zero_division=0)
    pc, rc, fc, support = precision_recall_fscore_support(y_true, y_pred, labels=index, average=None, zero_division=0)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((p, r, f))
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=index).tolist()
    assert [m["per_class"][c]["f1"] for c in labels] == pytest.approx(list(fc))
    assert [m["per_class"][c]["precision"] for c in labels] == pytest.approx(list(pc))
    assert [m["per_class"][c]["recall"] for c in labels] == pytest.approx(list(rc))
    assert [m["per_class"][c]["support"] for c in labels] == list(support)


# --- the run report ----------------------------------------------------------------------------------
#: A class name and a folder name as an attacker would pick them: the report must show them, never run them.
HOSTILE_CLASS = "<script>alert(1)</script>"
HOSTILE_FOLDER = "<img src=x onerror=alert(2)>"


@pytest.fixture(scope="module")
def hostile_run(lite0, tmp_path_factory) -> Path:
    """The checkpoint folder of a real short frozen run on the faces, the first class named like a script, in a
    folder named like an image tag."""
    images = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")
    faces = ArrayDataset((images * 255).astype(np.uint8), [0] * 100 + [1] * 100, [HOSTILE_CLASS, "non_face"], seed=0,
                         split_ratio=SPLIT)
    root = tmp_path_factory.mktemp("report") / HOSTILE_FOLDER
    task = ImageClassifierTask(lite0, faces, config=config(root, num_epoch=2, eval_interval=3, learning_rate=1e-2),
                               strategy=hub.FeatureExtractionStrategy(head="fc"))
    task.finetune_and_eval()
    return root / "ckpt"


@pytest.mark.slow
def test_the_run_report_escapes_class_names_and_paths_and_runs_nothing(hostile_run):
    page = (hostile_run / "report.html").read_text()
    assert HOSTILE_CLASS not in page and HOSTILE_FOLDER not in page
    assert html.escape(HOSTILE_CLASS) in page and html.escape(HOSTILE_FOLDER) in page  # shown, as text
    assert "<script" not in page.lower() and not re.search(r"<[^<>]*\son\w+\s*=", page)  # no tag runs anything
    assert re.findall(r'(?:src|href)="(?!data:)', page) == []  # nothing fetched: the curves are embedded
    assert "default-src 'none'" in page  # and the browser is told to fetch and run nothing, whatever slipped in


@pytest.mark.slow
def test_the_run_report_shows_scores_curves_and_confusion_in_a_real_browser(hostile_run, browser, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException  # noqa: PLC0415 (selenium is optional)
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    summary = json.loads((hostile_run / "metrics.json").read_text())
    metrics = summary["metrics"]
    browser.get_log("browser")  # drop what earlier pages logged
    browser.get((hostile_run / "report.html").as_uri())
    for name in ("acc", "f1", "loss"):
        assert browser.find_element(By.CSS_SELECTOR, f'#scores td[data-score="{name}"]').text == f"{metrics[name]:.4f}"
    assert f"{summary['best_score']:.4f}" in browser.find_element(By.ID, "best").text
    widths = browser.execute_script("return Object.fromEntries(Array.from(document.images, i => [i.id, i.complete ? i.naturalWidth : 0]))")
    # the curves, the highest-loss images and their heat maps, decoded from the page itself
    assert widths == {"curves": 800, "top-losses": Image.open(hostile_run / "top_losses.png").width,
                      "gradcam": Image.open(hostile_run / "gradcam.png").width}, widths
    cells = [[int(td.text) for td in tr.find_elements(By.TAG_NAME, "td")]
             for tr in browser.find_elements(By.CSS_SELECTOR, "#confusion tr")[1:]]
    assert cells == metrics["confusion_matrix"]
    assert HOSTILE_CLASS in browser.find_element(By.ID, "per-class").text  # the hostile name, shown as text
    assert browser.execute_script("return document.scripts.length") == 0
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.accept()
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []
    screenshot = (Path(__file__).parent.parent / "docs" if os.environ.get("HUBKIT_UPDATE_SCREENSHOTS") else tmp_path)
    browser.save_screenshot(str(screenshot / "run-report.png"))  # HUBKIT_UPDATE_SCREENSHOTS=1: the README's picture


# --- bad input, before training ------------------------------------------------------------------------
def test_bad_data_is_reported_before_training_and_nothing_is_lost(lite0, lfw, tmp_path):
    one_class = ArrayDataset(np.zeros((4, 8, 8), np.uint8), [0] * 4, ["only"])
    with pytest.raises(DatasetError, match="at least 2 classes"):
        ImageClassifierTask(lite0, one_class, config=config(tmp_path))

    root = tmp_path / "faces"
    for i, s in enumerate(lfw.samples("train")[:40]):
        folder = root / lfw.label_list[s.label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(s.source).save(folder / f"{i:03d}.png")
    data = hub.datasets.ImageFolder(root)
    good = ImageClassifierTask(lite0, data, config=config(tmp_path), strategy=hub.FeatureExtractionStrategy("svm"))
    good.finetune_and_eval()
    best_before = (tmp_path / "ckpt" / "best").read_text()

    (root / "face" / "broken.png").write_bytes(b"not a png at all")
    bad = hub.datasets.ImageFolder(root)
    task = ImageClassifierTask(lite0, bad, config=config(tmp_path, fresh=True), strategy=hub.FeatureExtractionStrategy("svm"))
    with pytest.raises(DatasetError, match="broken.png") as info:
        task.finetune_and_eval()
    assert "skip" in str(info.value)
    assert (tmp_path / "ckpt" / "best").read_text() == best_before  # the trained model is still there

    skipping = ImageClassifierTask(lite0, bad, config=config(tmp_path / "skip", skip_bad_files=True),
                                   strategy=hub.FeatureExtractionStrategy("svm"))
    skipping.finetune_and_eval()
    assert all("broken" not in s.origin for s in skipping.splits.samples["train"] + skipping.splits.samples["validate"])


def test_predicting_without_a_trained_model_fails_loudly(lite0, lfw, tmp_path):
    task = ImageClassifierTask(lite0, lfw, config=config(tmp_path))
    with pytest.raises(CheckpointError, match="no best model"):
        task.predict([lfw.samples("test")[0].source])
    with pytest.raises(CheckpointError, match="no best model"):
        task.evaluate("test")


def test_bad_configuration_is_refused():
    with pytest.raises(ConfigError):
        RunConfig(batch_size=0)
    with pytest.raises(ConfigError):
        hub.FullFineTune(head="svm")  # the SVM is fitted on extracted features
    with pytest.raises(ConfigError):
        hub.FeatureExtractionStrategy(l2_sp=1.0)
    with pytest.raises(ConfigError):
        hub.FreezeFirstK()
    with pytest.raises(ConfigError, match="unknown strategy 'frozn'"):
        make_strategy("frozn")
    with pytest.raises(ConfigError, match="backbone_lr_mult does not apply to the frozen strategy"):
        make_strategy("frozen", backbone_lr_mult=0.5)


def test_strategies_by_name_as_hub_finetune_builds_them():
    assert set(STRATEGY_NAMES) == set(hub.finetune.STRATEGIES)  # the CLI offers exactly the library's strategies
    assert make_strategy("freeze_k").k == 3 and make_strategy("freeze_k", freeze_until="stage2").until == "stage2"
    finetune = make_strategy("finetune", "gap_linear", backbone_lr_mult=0.5, l2_sp=0.01, schedule="cosine")
    assert isinstance(finetune, hub.FullFineTune) and finetune.head.kind == "gap_linear"
    assert (finetune.backbone_lr_mult, finetune.l2_sp, finetune.schedule) == (0.5, 0.01, "cosine")
    assert make_strategy("ulmfit").schedule == hub.ULMFiT().schedule  # None leaves the strategy's own default


# --- export -> hub install -> hub run -> fine-tune again ---------------------------------------------------
@pytest.mark.slow
def test_export_install_run_and_finetune_again(lite0_home, lfw, tmp_path, run_hub, photos):
    module = hub.Module(name="efficientnet_lite0")
    strategy = hub.FullFineTune(FCHead(hidden=(32,), dropout=0.1), cut_at="stage3")
    task = ImageClassifierTask(module, lfw, config=config(tmp_path, max_steps=4, learning_rate=3e-3), strategy=strategy)
    task.finetune_and_eval()
    exported = task.export(tmp_path / "faces_module")
    manifest = json.loads((exported / "module.json").read_text())
    assert manifest["name"] == "faces_module" and manifest["num_classes"] == 2
    assert manifest["architecture"]["head"]["cut_at"] == "blocks.4"
    assert manifest["weights"]["sources"][0]["kind"] == "path" and manifest["weights"]["key_map"] == {"kind": "identical"}
    assert (exported / "labels.txt").read_text().split() == ["face", "non_face"]

    face = Path(tmp_path / "face.png")
    Image.fromarray(lfw.samples("test")[0].source).save(face)
    expected = task.predict([face], top_k=2)[0].top_k

    run_hub("install", str(exported), check=True)
    proc = run_hub("run", "faces_module", "--input_path", str(face), "--top_k", "2", "--json", "--precision", "fp32",
                   check=True)
    got = json.loads(proc.stdout)["predictions"][0]["top_k"]
    assert [c["label"] for c in got] == [c.label for c in expected]
    assert got[0]["probability"] == pytest.approx(expected[0].probability, abs=1e-3)

    # the exported module is a module like any other: fine-tune it again (frozen, gap_linear)
    again = hub.Module(name="faces_module")
    assert again.manifest.features.pooled_channels == 112
    second = ImageClassifierTask(again, lfw, config=config(tmp_path / "again", num_epoch=2),
                                 strategy=hub.FeatureExtractionStrategy("gap_linear"))
    result = second.finetune_and_eval()
    assert result.best_score is not None and second.in_features == 112
    plain = second.export(tmp_path / "faces_plain")
    reloaded = hub.Module(directory=str(plain), precision="fp32")
    assert reloaded.predict([face], top_k=1)[0].top_k[0].label == second.predict([face])[0].top_k[0].label


# --- using a run without exporting it ---------------------------------------------------------------
@pytest.mark.slow
def test_hub_evaluate_and_predict_use_a_run_folder_as_it_was_trained(lite0_home, lfw_folder, run_hub, tmp_path):
    data, run_dir = tmp_path / "faces", tmp_path / "run"
    shutil.copytree(lfw_folder, data)
    report = json.loads(run_hub("finetune", "efficientnet_lite0", "--dataset", str(data), "--input-size", "32",
                                "--epochs", "2", "--checkpoint_dir", str(run_dir), "--device", "cpu", "--json", "--tta",
                                check=True).stdout)
    trained, tta = report["test_metrics"], report["tta"]
    assert tta["split"] == "validate" and tta["chosen"] == ("flip" if tta["flip_acc"] > tta["plain_acc"] else None)
    assert (report["tta_test_metrics"] is not None) == (tta["chosen"] == "flip")
    scored = run_hub("evaluate", str(run_dir), "--device", "cpu", check=True).stdout
    assert f"test split ({trained['images']} images): acc {trained['acc']:.4f}" in scored and "non_face" in scored

    face = data / "face" / "000.png"
    expected = ImageClassifierTask.from_run(run_dir, device="cpu").predict([face], top_k=2)[0].top_k
    shutil.rmtree(data)  # predicting needs the class names only, which the run recorded
    got = json.loads(run_hub("predict", str(run_dir), "--input_path", str(lfw_folder / "face" / "000.png"), "--json",
                             "--device", "cpu", check=True).stdout)["predictions"][0]["top_k"]
    assert [c["label"] for c in got] == [c.label for c in expected]
    assert got[0]["probability"] == pytest.approx(expected[0].probability, abs=1e-4)
    moved = run_hub("evaluate", str(run_dir), "--device", "cpu")
    assert moved.returncode == 1 and "--dataset" in moved.stderr and "Traceback" not in moved.stderr
    (run_dir / "run.json").write_text(json.dumps({"dataset": {"path": str(tmp_path), "no_such_option": 1}}))
    damaged = run_hub("evaluate", str(run_dir), "--device", "cpu")
    assert damaged.returncode == 1 and "run.json is malformed" in damaged.stderr and "Traceback" not in damaged.stderr


@pytest.mark.parametrize("strategy", [hub.FreezeFirstK(2, head=FCHead(hidden=(16,))), hub.FullFineTune(backbone_lr_mult=0.5),
                                      hub.LPFT(), hub.FeatureExtractionStrategy("logistic", cut_at="stage3")],
                         ids=lambda s: s.name)
def test_a_run_is_rebuilt_with_its_strategy_and_weights(strategy, lite0, lfw, tmp_path):
    task = ImageClassifierTask(lite0, lfw, config=config(tmp_path, max_steps=2, num_epoch=2), strategy=strategy)
    task.finetune_and_eval()
    rebuilt = ImageClassifierTask.from_run(tmp_path / "ckpt", lfw, device="cpu")
    assert rebuilt.strategy.settings() == task.strategy.settings()
    trained = ImageClassifierTask(lite0, lfw, config=config(tmp_path, max_steps=2, num_epoch=2), strategy=strategy)
    assert rebuilt.evaluate("test")["confusion_matrix"] == trained.evaluate("test")["confusion_matrix"]
    with pytest.raises(DatasetError, match="classes"):
        ImageClassifierTask.from_run(tmp_path / "ckpt", ArrayDataset(np.zeros((4, 8, 8, 3), np.uint8), [0, 1, 2, 0],
                                                                     ["a", "b", "c"]))


# --- test-time augmentation ------------------------------------------------------------------------
@pytest.mark.slow
def test_flip_tta_is_kept_only_when_it_helps_on_validate_and_travels_with_the_export(lite0_home, lfw, tmp_path):
    task = ImageClassifierTask(hub.Module(name="efficientnet_lite0"), lfw, config=config(tmp_path, num_epoch=3),
                               strategy=hub.FeatureExtractionStrategy("fc"))
    task.finetune_and_eval()
    plain = task.evaluate("validate")
    assert task.tta is None and task.tta_choice is None  # nothing chosen until asked
    choice = task.choose_tta()
    assert choice["plain_acc"] == plain["acc"] == task.evaluate("validate", tta=False)["acc"]
    assert choice["chosen"] == task.tta == ("flip" if choice["flip_acc"] > plain["acc"] else None)

    face, mirrored = tmp_path / "face.png", tmp_path / "mirrored.png"
    Image.fromarray(lfw.samples("test")[0].source).save(face)
    Image.fromarray(lfw.samples("test")[0].source[:, ::-1]).save(mirrored)
    one, other = (task.predict([path], top_k=2, tta=False)[0].top_k for path in (face, mirrored))
    by_hand = {c.label: c.probability / 2 for c in one}
    for c in other:
        by_hand[c.label] += c.probability / 2
    task.tta = "flip"  # whatever this data chose: the averaged prediction is what "flip" means
    averaged = task.predict([face], top_k=2)[0].top_k
    assert {c.label: c.probability for c in averaged} == pytest.approx(by_hand, abs=2e-3)
    assert task.evaluate("validate")["acc"] == choice["flip_acc"]

    hub.install(str(task.export(tmp_path / "faces_tta")))
    assert hub.Module(name="faces_tta").manifest.preprocessing.tta == "flip"
    for runtime in ("torch", "openvino"):
        got = hub.Module(name="faces_tta", runtime=runtime, precision="fp32").predict([face], top_k=2)[0].top_k
        assert {c.label: c.probability for c in got} == pytest.approx(by_hand, abs=2e-3), runtime
    compiled = open_compiled("faces_tta", runtime="openvino", precision="fp32")  # what `hub run` uses
    assert {c.label: c.probability for c in compiled.predict([face], top_k=2)[0].top_k} == pytest.approx(by_hand, abs=2e-3)


# --- the learning-rate finder ----------------------------------------------------------------------
@pytest.mark.slow
def test_the_learning_rate_finder_suggests_a_rate_and_puts_the_weights_back(lite0_home, digits, lfw_folder, run_hub,
                                                                            tmp_path):
    task = ImageClassifierTask(hub.Module(name="efficientnet_lite0"), digits, config=config(tmp_path),
                               strategy=hub.FeatureExtractionStrategy(head="fc"))
    before = {k: v.clone() for k, v in task.model.head.state_dict().items()}
    sweep = task.find_lr(steps=80)
    assert sweep.learning_rates == sorted(sweep.learning_rates) and sweep.learning_rates[0] == pytest.approx(1e-7)
    assert min(sweep.losses) < sweep.losses[0] - 0.3  # the loss fell somewhere in the sweep
    assert 1e-5 <= sweep.suggested <= 1, sweep.suggested  # where AdamW trains a head on frozen features
    assert sweep.plot == tmp_path / "ckpt" / "lr_finder.png" and sweep.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(torch.equal(before[k], v) for k, v in task.model.head.state_dict().items())
    with pytest.raises(ConfigError, match="no learning rate"):
        ImageClassifierTask(hub.Module(name="efficientnet_lite0"), digits, config=config(tmp_path / "svm"),
                            strategy=hub.FeatureExtractionStrategy(head="svm")).find_lr()

    proc = run_hub("finetune", "efficientnet_lite0", "--dataset", str(lfw_folder), "--find-lr", "--input-size", "32",
                   "--checkpoint_dir", str(tmp_path / "cli"), "--device", "cpu", check=True)
    assert "suggested learning rate: --lr " in proc.stdout and (tmp_path / "cli" / "lr_finder.png").is_file()
    assert not list((tmp_path / "cli").glob("*.pt"))  # a sweep, not a training run
