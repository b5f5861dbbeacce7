"""The linear probes (SVM and logistic heads) on real backbone features, their honest reporting,
and LP-FT, which starts fine-tuning from such a probe."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

import hubkit as hub
from hubkit.cli.finetune import HEAD_NAMES, STRATEGY_NAMES
from hubkit.errors import ConfigError
from hubkit.finetune import LPFT, ImageClassifierTask, LogisticHead, RunConfig, SVMHead, make_head
from hubkit.models.heads import HEADS, LINEAR_CS, plain_linear


def accuracy(weight, bias, x, y) -> float:
    return float(np.mean((x @ weight.T + bias).argmax(1) == y))


#: A short grid (and 3 folds) keeps the side-by-side fits affordable on a busy 2-core machine.
GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def sklearn_baseline(kind: str, x, y):
    """The hand-written way: StandardScaler + LogisticRegression / LinearSVC, stratified 3-fold CV over C."""
    model = LogisticRegression(max_iter=3000) if kind == "logistic" else LinearSVC(dual=False, max_iter=5000)
    step = type(model).__name__.lower()
    search = GridSearchCV(make_pipeline(StandardScaler(), model), {f"{step}__C": list(GRID)},
                          cv=StratifiedKFold(3, shuffle=True, random_state=0))
    return search.fit(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["logistic", "svm"])
def test_linear_heads_match_a_hand_written_scikit_learn_baseline(kind, digit_features):
    (x, y), (xt, yt) = digit_features["train"], digit_features["test"]
    head = make_head({"kind": kind, "Cs": GRID, "folds": 3})
    weight, bias = head.fit(x, y, 10)  # one linear layer on the raw features: the standardisation folded in
    baseline = sklearn_baseline(kind, x, y)
    ours, theirs = accuracy(weight, bias, xt, yt), baseline.score(xt, yt)
    assert ours > 0.6  # chance is 0.1
    assert ours >= theirs - 0.03, (ours, theirs)  # as good as the hand-written way (or better)
    (their_c,) = baseline.best_params_.values()
    assert abs(np.log10(head.best_C) - np.log10(their_c)) <= 1.0, (head.best_C, their_c)
    assert head.cv_score == pytest.approx(baseline.best_score_, abs=0.04)
    assert head.summary()["cv_folds"] == 3 and head.summary()["C"] == head.best_C


def test_the_default_grid_reaches_the_strong_regularisers_standardised_features_need():
    assert min(LINEAR_CS) <= 1e-5 and max(LINEAR_CS) >= 10 and {1e-4, 3e-4, 1e-3} <= set(LINEAR_CS)
    assert LogisticHead().Cs == SVMHead().Cs == tuple(sorted(LINEAR_CS)) and LogisticHead().folds == 5


def test_a_class_too_small_for_cross_validation_is_named():
    x, y = load_digits(return_X_y=True)  # real digits' raw pixels: the check is on labels, before any fitting
    keep = np.flatnonzero(y != 7)[:60].tolist() + [int(np.flatnonzero(y == 7)[0])]  # one image of class 7
    with pytest.raises(ConfigError, match=r"'seven' \(1 image\)") as info:
        LogisticHead().fit(x[keep], y[keep], 10, class_names=[*"012345", "six", "seven", "8", "9"])
    assert "add images" in info.value.hint
    with pytest.raises(ConfigError, match="folds"):
        SVMHead(folds=1)


@pytest.mark.slow
def test_closed_form_heads_report_cross_validation_and_test_never_training_data(lite0_home, lfw_folder, run_hub, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = run_hub("finetune", "efficientnet_lite0", "--dataset", str(lfw_folder), "--head", "logistic",
                   "--input-size", "32", "--checkpoint_dir", str(ckpt), "--device", "cpu", check=True)
    assert "trained 0 steps" not in proc.stdout and "best acc" not in proc.stdout, proc.stdout
    assert "fitted logistic head (C=" in proc.stdout and "5-fold CV acc" in proc.stdout, proc.stdout
    assert "on train+validate" in proc.stdout and "test (20 images): acc" in proc.stdout, proc.stdout
    report = json.loads((ckpt / "metrics.json").read_text())
    assert report["fit"]["head"] == "logistic" and report["metrics"]["split"] == "test"
    assert report["best_score"] == report["fit"]["cv_acc"]
    # the fitted probe became a linear layer on the backbone: Grad-CAM goes back through it, on the test split
    assert report["diagnosis"]["split"] == "test" and report["diagnosis"]["gradcam"] == {"layer": "blocks.2", "file": "gradcam.png"}
    assert Image.open(ckpt / "gradcam.png").size == Image.open(ckpt / "top_losses.png").size == (4 * 160, 4 * 190)


class RecordedProbe(LogisticHead):
    """A logistic probe that keeps the (weight, bias) its fit returned."""

    def fit(self, *args, **kwargs):
        self.fitted = super().fit(*args, **kwargs)
        return self.fitted


@pytest.mark.slow
def test_lpft_fine_tunes_from_the_weights_of_its_fitted_probe(lite0, lfw_folder, tmp_path):
    data = hub.datasets.ImageFolder(lfw_folder)
    probe_head = RecordedProbe(Cs=GRID, folds=3)
    # one step at a tiny learning rate: the trained head is still the probe's, unless it started elsewhere
    config = RunConfig(num_epoch=1, max_steps=1, batch_size=16, learning_rate=1e-6, input_size=32, progress=False,
                       eval_interval=1, checkpoint_dir=tmp_path / "ckpt", precision="fp32")
    task = ImageClassifierTask(lite0, data, config=config, strategy=LPFT(head=probe_head))
    result = task.finetune_and_eval()
    weight, bias = probe_head.fitted
    head = task.model.head
    assert np.allclose(head.weight.detach().numpy(), weight, atol=1e-4)
    assert np.allclose(head.bias.detach().numpy(), bias, atol=1e-4)
    probe = result.probe
    assert probe["head"] == "logistic" and probe["fitted_on"] == ["train"] and probe["C"] in GRID
    assert probe["validate_acc"] > 0.7  # faces vs non-faces from the probe alone; chance is 0.5
    assert result.steps == 1 and result.test_metrics["split"] == "test"
    assert json.loads((tmp_path / "ckpt" / "metrics.json").read_text())["probe"] == probe


def test_lpft_is_built_by_name_and_refuses_a_head_it_cannot_start_from():
    assert set(HEAD_NAMES) == set(HEADS)  # the CLI offers exactly the library's heads
    assert "lpft" in STRATEGY_NAMES
    lpft = hub.finetune.make_strategy("lpft")
    assert isinstance(lpft, LPFT) and isinstance(lpft.probe, LogisticHead) and plain_linear(lpft.head.build(8, 2))
    assert isinstance(hub.finetune.make_strategy("lpft", "svm").probe, SVMHead)
    with pytest.raises(ConfigError, match="linear probe"):
        LPFT(head="fc")
