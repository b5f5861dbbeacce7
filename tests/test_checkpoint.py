"""Checkpoints: complete, written atomically, exact resume after SIGKILL, refusal of mismatches."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import write_lfw_folder

from hubkit.errors import CheckpointError
from hubkit.finetune import CheckpointStore

RUN = ["--strategy", "ulmfit", "--head", "fc", "--hidden", "16", "--epochs", "2", "--batch-size", "16", "--lr", "0.01",
       "--input-size", "16", "--eval-interval", "3", "--save-interval", "2", "--seed", "7"]
STEPS_PER_EPOCH = 4  # 52 training images (80% of 64) in batches of 16
KILL_AT = Path(__file__).with_name("kill_at.py")  # runs `hub ARGS` and SIGKILLs it at a given point


@pytest.fixture(scope="module")
def faces_folder(tmp_path_factory) -> Path:
    """A class-per-folder dataset of real images: 32 faces and 32 non-faces from scikit-image's LFW subset."""
    return write_lfw_folder(tmp_path_factory.mktemp("faces"), per_class=32)


def load_state(directory: Path, which: str = "last") -> dict:
    return CheckpointStore(directory).load(which)


def hub_killed_at(point: str, *args: str) -> subprocess.CompletedProcess:
    """``hub ARGS`` that dies by SIGKILL at ``point`` (``step:N`` or ``save:N``, see kill_at.py)."""
    return subprocess.run([sys.executable, str(KILL_AT), point, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HUBKIT_DISABLE_PROGRESS": "1"})


@pytest.fixture(scope="module")
def straight_run(_lite0_home, faces_folder, tmp_path_factory) -> Path:
    """The checkpoint directory of a `hub finetune` run never interrupted (run once for this file)."""
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(_lite0_home, home, dirs_exist_ok=True)
    straight = tmp_path_factory.mktemp("straight") / "ckpt"
    proc = subprocess.run([sys.executable, "-m", "hubkit.cli", "finetune", "efficientnet_lite0", "--dataset",
                           str(faces_folder), *RUN, "--checkpoint_dir", str(straight)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HUBKIT_HOME": str(home), "HUBKIT_DISABLE_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"trained {2 * STEPS_PER_EPOCH} steps (2 epochs completed)" in proc.stdout
    assert f"step 3/{2 * STEPS_PER_EPOCH}: validate loss" in proc.stderr and "\r" not in proc.stderr  # plain log lines
    epochs = json.loads((straight / "metrics.json").read_text())["history"]["train_epoch"]
    assert [(e["epoch"], e["step"]) for e in epochs] == [(0, STEPS_PER_EPOCH), (1, 2 * STEPS_PER_EPOCH)]
    return straight


@pytest.mark.slow
def test_sigkill_mid_epoch_and_mid_save_resume_exactly_and_checkpoints_are_complete(straight_run, lite0_home,
                                                                                     faces_folder, tmp_path, run_hub):
    straight = straight_run
    base = ["finetune", "efficientnet_lite0", "--dataset", str(faces_folder), *RUN]

    ckpt = tmp_path / "killed"
    args = [*base, "--checkpoint_dir", str(ckpt)]
    # 1. killed by SIGKILL mid-epoch, at step 7: the checkpoint of step 6 (epoch 1, 2 batches in) is intact
    proc = hub_killed_at("step:7", *args)
    assert proc.returncode == -9, proc.stderr
    pointer = json.loads((ckpt / "last").read_text())
    assert pointer["step"] == 6 and (ckpt / "best").is_file()

    # ... and it holds everything an exact resume needs (read with torch.load(weights_only=True) after a sha256 check)
    state = load_state(ckpt)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "position", "rng", "strategy", "best_score",
            "best_step", "config_hash", "history", "run_id"} <= set(state)
    assert state["config_hash"] == pointer["config_hash"] and state["step"] == 6
    assert (state["epoch"], state["position"]) == (1, 6 - STEPS_PER_EPOCH)
    assert state["strategy"]["unfrozen"] == 1  # ULMFiT's phase: epoch 1 also trains the top group
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 6
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    assert any(k.startswith("head.") for k in state["model"]) and any(k.startswith("backbone.") for k in state["model"])
    assert state["best_score"] is not None and load_state(ckpt, "best")["step"] <= 6

    # 2. resumed, then killed while writing the final checkpoint: its temporary file on disk, the pointers untouched
    proc = hub_killed_at(f"save:{2 * STEPS_PER_EPOCH}", *args)
    assert proc.returncode == -9, proc.stderr
    assert list(ckpt.glob(f".*-step-{2 * STEPS_PER_EPOCH:08d}.pt.*.tmp"))
    assert json.loads((ckpt / "last").read_text())["step"] == 6 and load_state(ckpt)["step"] == 6

    # 3. resumed to the end: the same weights, bit for bit, as the run never interrupted
    proc = run_hub(*args, "--export", str(tmp_path / "faces_ulmfit"))
    assert proc.returncode == 0, proc.stderr
    assert "resumed from step 6" in proc.stdout
    assert json.loads((tmp_path / "faces_ulmfit" / "module.json").read_text())["num_classes"] == 2
    assert not list(ckpt.glob(".*.tmp"))
    a, b = load_state(straight), load_state(ckpt)
    assert a["step"] == b["step"] == 2 * STEPS_PER_EPOCH
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["best_score"] == b["best_score"] and a["history"] == b["history"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


@pytest.mark.slow
def test_resume_refuses_another_configuration_until_told_to_start_fresh(straight_run, lite0_home, faces_folder, run_hub):
    ckpt = straight_run
    args = ["finetune", "efficientnet_lite0", "--dataset", str(faces_folder), *RUN, "--checkpoint_dir", str(ckpt)]
    longer = [a if a != "2" or args[i - 1] != "--epochs" else "3" for i, a in enumerate(args)]
    proc = run_hub(*longer)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from step {2 * STEPS_PER_EPOCH}" in proc.stdout
    assert f"trained {3 * STEPS_PER_EPOCH} steps (3 epochs completed)" in proc.stdout
    before = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}

    other_lr = [a if a != "0.01" else "0.05" for a in args]
    proc = run_hub(*other_lr, "--max-steps", "1")
    assert proc.returncode == 1
    assert "different configuration" in proc.stderr and "learning_rate: 0.01 -> 0.05" in proc.stderr
    assert "--fresh" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()} == before  # nothing touched

    proc = run_hub(*other_lr, "--fresh", "--max-steps", "1")
    assert proc.returncode == 0, proc.stderr
    assert "trained 1 step (0 epochs completed)" in proc.stdout
    assert json.loads((ckpt / "last").read_text())["config"]["learning_rate"] == 0.05
    assert json.loads((ckpt / "best").read_text())["config"]["learning_rate"] == 0.05


def test_pointers_are_never_missing_while_checkpoints_are_written(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    store.save({"step": 0, "model": {"w": torch.zeros(1000)}}, run_id="r", step=0, config_hash="h", config={}, best=True)
    problems, done = [], threading.Event()

    def watch():
        while not done.is_set():
            for which in ("last", "best"):
                try:
                    json.loads((tmp_path / "ckpt" / which).read_text())
                except (OSError, ValueError) as exc:
                    problems.append(f"{which}: {exc}")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for step in range(1, 30):
            store.save({"step": step, "model": {"w": torch.full((1000,), float(step))}}, run_id="r", step=step,
                       config_hash="h", config={}, best=step % 5 == 0)
    finally:
        done.set()
        watcher.join()
    assert not problems
    assert store.load("last")["step"] == 29 and store.load("best")["step"] == 25
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt")) == ["r-step-00000025.pt", "r-step-00000029.pt"]


def test_damaged_or_unsafe_checkpoints_are_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match="no 'best' checkpoint"):
        store.load("best")
    store.save({"step": 1, "model": {"w": torch.ones(3)}}, run_id="r", step=1, config_hash="h", config={"lr": 1}, best=True)
    with pytest.raises(CheckpointError, match=r"different configuration \(lr: 1 -> 2\)"):
        store.check_config("other", {"lr": 2})
    path = tmp_path / "r-step-00000001.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        store.load("last")

    class Payload:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (print, ("owned",))

    buffer = io.BytesIO()
    torch.save({"model": Payload()}, buffer)
    path.write_bytes(buffer.getvalue())
    pointer = json.loads((tmp_path / "last").read_text())
    pointer["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    (tmp_path / "last").write_text(json.dumps(pointer))
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        store.load("last")


@pytest.mark.parametrize("pointer", ['["x"]', '{"sha256": "0"}', '{"file": "../../etc/passwd"}', "\udcff"])
def test_malformed_pointer_is_a_checkpoint_error(tmp_path, pointer):
    (tmp_path / "last").write_bytes(pointer.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError, match="checkpoint pointer"):
        CheckpointStore(tmp_path).load("last")


def test_resume_refusals_name_every_change_strategy_first_and_more_epochs_are_allowed(tmp_path):
    store = CheckpointStore(tmp_path)
    old = {"num_epoch": 3, "strategy.name": "freeze_k", "strategy.k": 3, **{f"opt{i}": i for i in range(8)}}
    store.save({"step": 1}, run_id="r", step=1, config_hash="h", config=old, best=True)
    new = {"num_epoch": 3, "strategy.name": "frozen", **{f"opt{i}": i + 1 for i in range(8)}}
    with pytest.raises(CheckpointError, match=r"\(strategy.name: 'freeze_k' -> 'frozen'; opt0: 0 -> 1; .*; and 4 more\)"):
        store.check_config("other", new)
    store.check_config("longer", {**old, "num_epoch": 5})  # a finished run given more epochs goes on
    with pytest.raises(CheckpointError, match="num_epoch: 3 -> 2"):
        store.check_config("shorter", {**old, "num_epoch": 2})
