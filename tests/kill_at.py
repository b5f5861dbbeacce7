"""Run ``hub ARGS...`` and die by SIGKILL at a chosen point, like a power cut (for the resume tests).

    python tests/kill_at.py step:N ARGS...        right after training step N (on every rank)
    python tests/kill_at.py rank1:step:N ARGS...  right after training step N, on rank 1 only (under torchrun)
    python tests/kill_at.py save:N ARGS...        while the checkpoint of step N is written: the file is
                                                  complete under its temporary name, not yet renamed

It wraps public hooks from outside the library: the training loop's ``TrainingLoop.train_step``
and ``os.replace``, the rename that commits a checkpoint file.
"""
from __future__ import annotations

import os
import signal
import sys

from hubkit.cli import main as hub
from hubkit.finetune import distributed as dist
from hubkit.finetune.loop import TrainingLoop


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_step(step: int, rank: int | None) -> None:
    train_step = TrainingLoop.train_step

    def train_step_then_maybe_die(self, *args, **kwargs):
        result = train_step(self, *args, **kwargs)
        if self.progress.step == step and (rank is None or dist.rank() == rank):
            die()
        return result

    TrainingLoop.train_step = train_step_then_maybe_die


def kill_before_commit(step: int) -> None:
    replace, checkpoint_file = os.replace, f"-step-{step:08d}.pt"

    def replace_unless_checkpoint(src, dst, *args, **kwargs):
        if os.fspath(dst).endswith(checkpoint_file):
            die()
        return replace(src, dst, *args, **kwargs)

    os.replace = replace_unless_checkpoint


if __name__ == "__main__":
    point, sys.argv[1:] = sys.argv[1], sys.argv[2:]
    *where, kind, number = point.split(":")
    if kind == "step":
        kill_after_step(int(number), int(where[0][len("rank"):]) if where else None)
    elif kind == "save":
        kill_before_commit(int(number))
    else:
        sys.exit(f"kill_at.py: unknown point {point!r} (step:N, rankR:step:N or save:N)")
    sys.argv[0] = "hub"
    hub()
