"""The fine-tuning API on real data: learning happens, each strategy changes what it should,
heads, metrics, reports, bad data, export -> hub install -> hub run -> fine-tune again."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import hubkit as hub
from hubkit.datasets import ArrayDataset, ImageSamples
from hubkit.errors import CheckpointError, ConfigError, DatasetError
from hubkit.finetune import (CheckpointStore, FCHead, ImageClassifierTask, RunConfig, classification_metrics,
                             make_strategy)
from hubkit.finetune.metrics import check_metric_names
from hubkit.finetune.model import block_groups
from hubkit.finetune.strategies import schedule_factor


# --- real data ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def digits() -> ArrayDataset:
    """300 of scikit-learn's 8x8 handwritten digits, 10 classes, split 70/15/15."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * 16).clip(0, 255).astype(np.uint8)
    return ArrayDataset(images[:300], d.target[:300], [str(i) for i in range(10)], seed=0)


@pytest.fixture(scope="session")
def lfw() -> ArrayDataset:
    """scikit-image's 200 25x25 crops: 100 faces then 100 non-faces."""
    import skimage

    images = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")
    return ArrayDataset((images * 255).astype(np.uint8), [0] * 100 + [1] * 100, ["face", "non_face"], seed=0)


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
    groups = dict(block_groups(task.model.backbone))
    optimizer_lrs = [g["lr"] for g in strategy.param_groups(task.model, 1.0)]
    assert optimizer_lrs == sorted(optimizer_lrs) and optimizer_lrs[-1] == 1.0  # discriminative: lower layers slower
    before = backbone_state(task)
    task.finetune_and_eval()
    after = backbone_state(task)
    assert strategy.state_dict()["unfrozen"] == 1  # epoch 0: head only; epoch 1: + the top group
    assert changed(before, after, groups["tail"]) and not changed(before, after, groups["stem"] + groups["blocks.6"])


def test_schedules_have_their_shape():
    one = schedule_factor("onecycle", 100)
    assert one(0) == pytest.approx(0.04) and one(30) == pytest.approx(1.0) and one(100) < 1e-3
    slanted = schedule_factor("slanted_triangular", 100, cut_frac=0.1, ratio=32)
    assert slanted(0) == pytest.approx(1 / 32) and slanted(10) == pytest.approx(1.0) and slanted(100) == pytest.approx(1 / 32)
    with pytest.raises(ConfigError):
        schedule_factor("linear", 10)


def test_frozen_features_cut_at_a_convolution_are_the_unfolded_backbones(lite0, lfw, tmp_path):
    strategy = hub.FeatureExtractionStrategy("fc", cut_at="conv_head")  # a conv with a BatchNorm after it
    task = ImageClassifierTask(lite0, lfw, config=config(tmp_path), strategy=strategy)
    images = torch.stack([ImageSamples(lfw.samples("train"), task.transform)[i][0] for i in range(4)])
    task.model.eval()
    with torch.no_grad():
        expected = task.model.forward_features(images)
    torch.testing.assert_close(task._frozen_features(images), expected, rtol=1e-4, atol=1e-4)
    extractor, _ = task._feature_extractor
    assert [n for n, m in extractor.named_modules() if isinstance(m, torch.nn.BatchNorm2d)] == ["backbone.bn2"]

    # a cut inside a folded BatchNormAct2d still resolves
    inside = ImageClassifierTask(lite0, lfw, config=config(tmp_path / "act"),
                                 strategy=hub.FeatureExtractionStrategy("fc", cut_at="bn2.act"))
    inside.model.eval()
    with torch.no_grad():
        expected = inside.model.forward_features(images)
    torch.testing.assert_close(inside._frozen_features(images), expected, rtol=1e-4, atol=1e-4)


def test_cut_backbone_and_custom_weights_by_name(lite0, lfw, tmp_path):
    from safetensors.torch import save_file

    task = ImageClassifierTask(lite0, lfw, config=config(tmp_path), strategy=hub.FullFineTune("fc", cut_at="stage2"))
    assert task.model.cut_at == "blocks.2" and task.in_features == 40
    assert task.model.forward_features(torch.zeros(2, 3, 32, 32)).shape == (2, 40)

    custom = {"conv_stem.weight": torch.full(task.model.backbone.conv_stem.weight.shape, 0.5)}
    save_file(custom, str(tmp_path / "custom.safetensors"))
    loaded = ImageClassifierTask(lite0, lfw, config=config(tmp_path),
                                 strategy=hub.FullFineTune("fc", weights=tmp_path / "custom.safetensors"))
    assert torch.equal(loaded.model.backbone.conv_stem.weight, custom["conv_stem.weight"])
    with pytest.raises(ConfigError, match="stage9"):
        ImageClassifierTask(lite0, lfw, config=config(tmp_path), strategy=hub.FullFineTune("fc", cut_at="stage9"))


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
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

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


# --- bad input, before training ------------------------------------------------------------------------
def test_bad_data_is_reported_before_training_and_nothing_is_lost(lite0, lfw, tmp_path):
    one_class = ArrayDataset(np.zeros((4, 8, 8), np.uint8), [0] * 4, ["only"])
    with pytest.raises(DatasetError, match="at least 2 classes"):
        ImageClassifierTask(lite0, one_class, config=config(tmp_path))

    from PIL import Image

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
    assert all("broken" not in s.origin for s in skipping._samples["train"] + skipping._samples["validate"])


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
    from hubkit._cli_train import STRATEGY_NAMES

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
    from PIL import Image

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
