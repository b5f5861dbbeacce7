"""`--strategy auto` on real digits: candidates cheapest first on the validation split within a time
budget, the best kept and exported, the test split scored once; a budget too small says so; a run
started again on its folder does not rerun the candidates it finished."""
from __future__ import annotations

import json

import pytest

import hubkit as hub
from hubkit.errors import ConfigError, DatasetError
from hubkit.finetune import ImageClassifierTask, RunConfig, auto_finetune, parse_duration


def config(folder) -> RunConfig:
    return RunConfig(input_size=32, batch_size=32, checkpoint_dir=folder, progress=False, precision="fp32")


def test_time_budgets_are_read_like_people_write_them():
    assert parse_duration("15m") == 900 and parse_duration("90s") == 90 and parse_duration("1.5h") == 5400
    assert parse_duration("120") == 120 and parse_duration(30) == 30
    for bad in ("soon", "-5m", "0", "15 minutes"):
        with pytest.raises(ConfigError, match="time budget"):
            parse_duration(bad)


@pytest.mark.slow
def test_auto_keeps_the_best_candidate_on_validate_scores_test_once_and_resumes(lite0_home, digits, tmp_path,
                                                                               monkeypatch):
    module = hub.Module(name="efficientnet_lite0")
    # far too little time for the cheapest candidate (encoding 300 images first): it says so, nothing kept
    with pytest.raises(ConfigError, match=r"too small for any candidate: the logistic probe needs about \d+ s"):
        auto_finetune(module, digits, time_budget=1, config=config(tmp_path / "tiny"))

    scored = []
    evaluate = ImageClassifierTask.evaluate
    monkeypatch.setattr(ImageClassifierTask, "evaluate",
                        lambda self, split="test": scored.append(split) or evaluate(self, split))
    result = auto_finetune(module, digits, time_budget="2m", config=config(tmp_path / "auto"))
    board = {c.name: c for c in result.leaderboard}
    assert list(board) == ["logistic", "svm", "lpft"]  # cheapest first
    assert board["logistic"].status == board["svm"].status == "done"
    finished = [c for c in result.leaderboard if c.validate_acc is not None]
    assert result.best == max(finished, key=lambda c: c.validate_acc).name
    assert board["logistic"].validate_acc > 0.5  # chance is 0.1
    assert scored.count("test") == 1 and result.test_metrics["split"] == "test"  # once, on the final choice only
    assert result.test_metrics["acc"] > 0.5 and result.seconds < 2 * 60 + 120  # the budget, and the final scoring
    for c in finished:  # no candidate looked at test
        assert json.loads((tmp_path / "auto" / c.name / "metrics.json").read_text())["test_metrics"] == {}
    record = json.loads((tmp_path / "auto" / "auto.json").read_text())
    assert record["best"] == result.best and record["test"]["acc"] == result.test_metrics["acc"]

    exported = result.task.export(tmp_path / "exported")
    predicted = hub.Module(directory=str(exported)).predict([digits.samples("test")[0].source])
    assert predicted[0].top_k[0].label in digits.label_list

    # started again on the same folder, with no time at all: the finished candidates are not rerun,
    # the best of them is kept and scored
    again = auto_finetune(module, digits, time_budget=1, config=config(tmp_path / "auto"))
    rows = {c.name: c for c in again.leaderboard}
    for name in ("logistic", "svm"):
        assert rows[name].validate_acc == board[name].validate_acc and "finished earlier" in rows[name].note
    assert again.best == result.best and again.test_metrics["split"] == "test"


@pytest.mark.slow
def test_auto_ranks_several_backbones_first_and_a_resumed_run_keeps_the_choice(lite0_home, digits, stage1_module_folder,
                                                                               tmp_path):
    hub.install(str(stage1_module_folder))
    stage1, lite0 = hub.Module(name="lite0_stage1"), hub.Module(name="efficientnet_lite0")
    result = auto_finetune(stage1, digits, time_budget="20s", config=config(tmp_path / "auto"), backbones=[lite0])
    ranked = [b.module for b in result.backbones]
    assert sorted(ranked) == ["efficientnet_lite0==1.0.0", "lite0_stage1==1.0.0"]
    assert result.backbones[0].probe_accuracy >= result.backbones[1].probe_accuracy
    assert result.task.module.manifest.ref == ranked[0] and result.best is not None
    assert result.seconds <= 20 + 5  # the ranking's time counts against the budget
    recorded = (tmp_path / "auto" / "backbones.json").read_bytes()

    again = auto_finetune(stage1, digits, time_budget=1, config=config(tmp_path / "auto"), backbones=[lite0])
    assert [b.module for b in again.backbones] == ranked and again.task.module.manifest.ref == ranked[0]
    assert (tmp_path / "auto" / "backbones.json").read_bytes() == recorded


def test_auto_needs_a_validation_split(lite0_home, tmp_path):
    data = hub.datasets.ArrayDataset([[[0, 255], [255, 0]]] * 4, [0, 1, 0, 1], ["a", "b"],
                                     splits={"train": range(4), "test": range(4)})
    with pytest.raises(DatasetError, match="validation split"):
        auto_finetune(hub.Module(name="efficientnet_lite0"), data, time_budget="1m", config=config(tmp_path))


@pytest.mark.slow
def test_the_cli_says_when_the_budget_is_too_small(lite0_home, lfw_folder, run_hub, tmp_path):
    proc = run_hub("finetune", "efficientnet_lite0", "--dataset", str(lfw_folder), "--strategy", "auto",
                   "--time-budget", "1s", "--input-size", "32", "--checkpoint_dir", str(tmp_path / "ckpt"),
                   "--device", "cpu")
    assert proc.returncode == 1, proc.stderr
    assert "error: a time budget of 1 s is too small for any candidate" in proc.stderr and "Traceback" not in proc.stderr
    wrong = run_hub("finetune", "efficientnet_lite0", "--dataset", str(lfw_folder), "--time-budget", "5m")
    assert wrong.returncode == 2 and "only --strategy auto takes a time budget" in wrong.stderr
    wrong = run_hub("finetune", "efficientnet_lite0", "--dataset", str(lfw_folder), "--backbones", "efficientnet_lite1")
    assert wrong.returncode == 2 and "only --strategy auto takes backbones" in wrong.stderr
