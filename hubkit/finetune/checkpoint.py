"""Checkpoints that survive being killed at any moment, and resume exactly.

Layout of a checkpoint directory::

    <run>-step-00000120.pt   one complete training state (torch.save of tensors and plain
                             containers only: read back with ``torch.load(weights_only=True)``)
    last                     JSON pointer to the newest state: file, sha256, step, config hash
    best                     JSON pointer to the state with the best evaluation score

A state file is written to a temporary file, fsynced and renamed; only then are the pointers
replaced (atomically, ``best`` before ``last``), and only then are files no pointer names
removed. So ``last`` and ``best`` always name a complete file, whatever moment a run dies.
"""
from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import torch

from .. import constants
from .._fs import atomic_write_bytes, atomic_write_json, fsync_dir, sha256_file
from ..errors import CheckpointError

LAST, BEST = "last", "best"
FRESH_HINT = "use a new checkpoint_dir, or start over with fresh=True (hub finetune --fresh)"


def _test_kill(point: str) -> None:
    """Tests only: die by SIGKILL at a named point (``HUBKIT_TEST_KILL_AT``), like a power cut."""
    if constants.HUBKIT_TEST_KILL_AT == point:
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointStore:
    """The ``last``/``best`` checkpoints of one run directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def pointer(self, which: str) -> dict | None:
        path = self.directory / which
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"checkpoint pointer {path} is unreadable: {exc}", hint=FRESH_HINT) from None
        file = data.get("file") if isinstance(data, dict) else None
        if not isinstance(file, str) or not file or "/" in file or "\\" in file or file in (".", ".."):
            raise CheckpointError(f"checkpoint pointer {path} is malformed", hint=FRESH_HINT)
        return data

    def has(self, which: str = LAST) -> bool:
        return (self.directory / which).is_file()

    def check_config(self, config_hash: str, config: dict) -> None:
        """Refuse to resume from (or predict with) a checkpoint made with another configuration."""
        ptr = self.pointer(LAST) or self.pointer(BEST)
        if ptr is None or ptr.get("config_hash") == config_hash:
            return
        old = ptr.get("config", {})
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in changed[:4]) or "configuration hash differs"
        raise CheckpointError(f"the checkpoint in {self.directory} was made with a different configuration ({detail})",
                              hint=FRESH_HINT)

    def load(self, which: str = LAST) -> dict:
        """The training state a pointer names, checked against its sha256."""
        ptr = self.pointer(which)
        if ptr is None:
            raise CheckpointError(f"no '{which}' checkpoint in {self.directory}",
                                  hint="train first (task.finetune_and_eval() / hub finetune) or point at the right checkpoint_dir")
        path = self.directory / ptr["file"]
        if not path.is_file():
            raise CheckpointError(f"{path} named by '{which}' is missing", hint=FRESH_HINT)
        data = path.read_bytes()
        import hashlib

        if hashlib.sha256(data).hexdigest() != ptr.get("sha256"):
            raise CheckpointError(f"{path} does not match the sha256 recorded in '{which}' (damaged)", hint=FRESH_HINT)
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # an unpickling refusal or a damaged archive: both mean "do not use"
            raise CheckpointError(f"{path} cannot be read safely: {str(exc).splitlines()[0][:200]}", hint=FRESH_HINT) from None

    def save(self, state: dict, *, run_id: str, step: int, config_hash: str, config: dict, best: bool,
             score: float | None = None, metric: str | None = None) -> Path:
        """Write ``state`` durably, then point ``best`` (when ``best``) and ``last`` at it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        name = f"{run_id}-step-{step:08d}.pt"
        if constants.HUBKIT_TEST_KILL_AT == f"save:{step}":
            partial = self.directory / f".{name}.partial.tmp"
            partial.write_bytes(data[: len(data) // 2])
            _test_kill(f"save:{step}")
        atomic_write_bytes(self.directory / name, data)
        pointer = {"file": name, "sha256": sha256_file(self.directory / name), "size": len(data), "step": step,
                   "epoch": state.get("epoch"), "config_hash": config_hash, "config": config}
        if best:
            atomic_write_json(self.directory / BEST, {**pointer, "metric": metric, "score": score})
        atomic_write_json(self.directory / LAST, pointer)
        self._sweep()
        return self.directory / name

    def _sweep(self) -> None:
        """Remove state files no pointer names, and temporary files of interrupted writes."""
        live = {p["file"] for p in (self.pointer(LAST), self.pointer(BEST)) if p}
        removed = False
        for path in self.directory.iterdir():
            if (path.suffix == ".pt" and path.name not in live) or (path.name.startswith(".") and path.name.endswith(".tmp")):
                path.unlink(missing_ok=True)
                removed = True
        if removed:
            fsync_dir(self.directory)
