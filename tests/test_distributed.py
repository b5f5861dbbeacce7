"""``hub finetune`` under torchrun: 2 processes on 127.0.0.1, gloo on the CPU, real images.

What is proved, on scikit-image's LFW faces vs non-faces written as a class-per-folder dataset:
the 2-process run reaches the same accuracy (and, within float rounding, the same weights) as one
process; the module is installed and the features are computed once, by rank 0, and read from the
cache by rank 1; only rank 0 writes and prints; and a job that loses a worker (SIGKILL, after which
torchrun stops the other) resumes to the same weights, bit for bit, as the job never interrupted.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hubkit.finetune import CheckpointStore
from hubkit.serving import free_port

# Dropout 0: with dropout, each rank draws masks for its slice of the batch from its own random
# stream, so 2 processes and 1 process drop different units (both correct, not equal).
# Batch 17: the 160 training images end each epoch with a batch of 7 (4 + 3 images on 2 ranks).
RUN = ["--strategy", "frozen", "--head", "fc", "--hidden", "32", "--dropout", "0", "--epochs", "3",
       "--batch-size", "17", "--lr", "0.01", "--input-size", "16", "--eval-interval", "5", "--save-interval", "4",
       "--seed", "3", "--json"]
STEPS = 30  # 3 epochs of 10 global batches
KILL_AT = Path(__file__).with_name("kill_at.py")  # runs `hub ARGS` and SIGKILLs it at a given point


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """An empty HUBKIT_HOME shared by this file's runs: the first run installs the module."""
    return tmp_path_factory.mktemp("hubhome")


def hub_finetune(home: Path, faces: Path, ckpt: Path, *, nproc: int | None, kill_at: str | None = None,
                 extra: tuple[str, ...] = (), timeout: float = 240) -> subprocess.CompletedProcess:
    """``hub finetune`` as a user runs it: plainly (nproc None) or under ``torchrun --nproc_per_node N``;
    with ``kill_at`` (e.g. ``rank1:step:14``) a process dies by SIGKILL there (see kill_at.py)."""
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                         "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    hub = ["-m", "hubkit.cli"] if kill_at is None else [str(KILL_AT), kill_at]
    args = [sys.executable, *launcher, *hub, "finetune", "efficientnet_lite0", "--dataset", str(faces),
            *RUN, *extra, "--checkpoint_dir", str(ckpt)]
    full_env = {**os.environ, "HUBKIT_HOME": str(home), "HUBKIT_DISABLE_PROGRESS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(name, None)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill_job(proc.pid)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _kill_job(launcher_pid: int) -> None:
    """SIGKILL whatever is left of a launch: the launcher's process group and each worker's
    (torchrun starts every worker in a session of its own, out of the launcher's group)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher_pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(stat.parent.name), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(launcher_pid, signal.SIGKILL)


def load(ckpt: Path, which: str = "last") -> dict:
    return CheckpointStore(ckpt).load(which)


@pytest.fixture(scope="module")
def straight(home, lfw_folder, tmp_path_factory):
    """The uninterrupted 2-process run, from an empty cache: (checkpoint dir, its JSON result)."""
    ckpt = tmp_path_factory.mktemp("straight") / "ckpt"
    proc = hub_finetune(home, lfw_folder, ckpt, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt, json.loads(proc.stdout)  # one JSON document: only rank 0 prints


@pytest.mark.slow
def test_two_processes_reach_the_accuracy_of_one_and_only_rank_0_writes(home, lfw_folder, straight, tmp_path):
    ckpt2, two = straight
    summary = json.loads((ckpt2 / "metrics.json").read_text())
    assert summary["distributed"]["world_size"] == 2 and summary["distributed"]["backend"] == "gloo"
    # rank 0 computed the train/validate/test features; rank 1 waited, then read them from the cache
    assert summary["distributed"]["feature_stats_per_rank"] == [{"computed": 3, "cached": 0},
                                                                 {"computed": 0, "cached": 3}]
    assert len(list((home / "features").glob("*.safetensors"))) == 3
    assert len(list((ckpt2 / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in ckpt2.iterdir() if p.suffix != ".pt") == ["best", "curves.png", "gradcam.png", "last",
                                                                          "metrics.json", "report.html", "run.json",
                                                                          "tensorboard", "top_losses.png"]

    ckpt1 = tmp_path / "one"
    proc = hub_finetune(home, lfw_folder, ckpt1, nproc=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads(proc.stdout)
    assert two["steps"] == one["steps"] == STEPS and two["metrics"]["images"] == one["metrics"]["images"] == 20
    # equal accuracy, best step and confusion matrix; the loss agrees to float rounding
    assert one["best_score"] > 0.7, one  # chance is 0.5: it learned
    assert two["best_score"] == one["best_score"] and two["best_step"] == one["best_step"]
    assert two["metrics"]["confusion_matrix"] == one["metrics"]["confusion_matrix"]
    assert two["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-5)
    # rank 0 diagnosed the logits both ranks gathered: the same images, though each rank scored half of them
    why_two, why_one = summary["diagnosis"], json.loads((ckpt1 / "metrics.json").read_text())["diagnosis"]
    assert [r["image"] for r in why_two["top_losses"]] == [r["image"] for r in why_one["top_losses"]]
    assert [r["loss"] for r in why_two["top_losses"]] == pytest.approx([r["loss"] for r in why_one["top_losses"]], rel=1e-4)
    assert why_two["confused_pairs"] == why_one["confused_pairs"]
    # the same weights up to the order of float additions (two half-batch sums vs one batch sum)
    a, b = load(ckpt1), load(ckpt2)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-5) for k in a["model"])
    # the training curve logged by rank 0 is the global batch's (reduced across ranks), as one process logs it
    assert [r["acc"] for r in a["history"]["eval"]] == [r["acc"] for r in b["history"]["eval"]]
    assert [r["loss"] for r in a["history"]["train"]] == pytest.approx([r["loss"] for r in b["history"]["train"]],
                                                                       rel=1e-5)


@pytest.mark.slow
def test_losing_a_worker_then_resuming_ends_exactly_like_the_uninterrupted_run(home, lfw_folder, tmp_path):
    # with dropout, so that each rank's random stream matters: the checkpoint must restore both
    dropout = ("--dropout", "0.3")
    ckpt_straight = tmp_path / "straight"
    proc = hub_finetune(home, lfw_folder, ckpt_straight, nproc=2, extra=dropout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "killed"
    # 1. rank 1 dies (SIGKILL) at step 14; torchrun stops rank 0; the checkpoint of step 12 is intact
    proc = hub_finetune(home, lfw_folder, ckpt, nproc=2, extra=dropout, kill_at="rank1:step:14")
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    assert json.loads((ckpt / "last").read_text())["step"] == 12
    assert len(load(ckpt)["rng_ranks"]) == 2  # both ranks' random states, for an exact resume

    # 2. resumed to the end: the same weights, bit for bit, as the job never interrupted
    proc = hub_finetune(home, lfw_folder, ckpt, nproc=2, extra=dropout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["resumed_from_step"] == 12
    a, b = load(ckpt_straight), load(ckpt)
    assert a["step"] == b["step"] == STEPS
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["best_score"] == b["best_score"] and a["history"] == b["history"]
    assert not list(ckpt.glob(".*.tmp"))
