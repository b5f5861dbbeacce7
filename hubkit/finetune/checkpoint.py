"""Checkpoints that survive being killed at any moment, and resume exactly.

Layout of a checkpoint directory::

    <run>-step-00000120.pt   one complete training state (torch.save of tensors and plain
                             containers only: read back with ``torch.load(weights_only=True)``)
    last                     JSON pointer to the newest state: file, sha256, step, config hash
    best                     JSON pointer to the state with the best evaluation score
    run.json                 how the run was started: its dataset and custom backbone weights
                             (what ``ImageClassifierTask.from_run`` needs beyond ``best``)

A state file is written to a temporary file, fsynced and renamed; only then are the pointers
replaced (atomically, ``best`` before ``last``), and only then are files no pointer names
removed. So ``last`` and ``best`` always name a complete file, whatever moment a run dies.

A state is saved and restored in the style of Lightning Fabric: ``store.save(state, ...)`` saves
each object that has a ``state_dict()`` as its state dict and plain values as they are;
``restore(checkpoint, state)`` loads each such object back in place and returns the rest.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import CheckpointError
from ..hub.fs import atomic_write_bytes, atomic_write_json, fsync_dir, read_capped, sha256_file

LAST, BEST = "last", "best"
#: The run record's file name (see ``CheckpointStore.write_run``).
RUN_RECORD = "run.json"
#: Settings that may grow between a run and its resumption (a finished run given more epochs goes on).
EXTENDABLE = frozenset({"num_epoch"})
#: How many changed settings a refusal to resume names before "and N more".
SHOWN_CHANGES = 6
FRESH_HINT = "use a new checkpoint_dir, or start over with fresh=True (hub finetune --fresh)"


@dataclass(frozen=True)
class Stateful:
    """A piece of state saved and restored through two functions (for what has no ``state_dict``
    of its own, or needs another argument to load)."""

    state_dict: Callable[[], Any]
    load_state_dict: Callable[[Any], None]


def _savable(state: Mapping[str, Any]) -> dict:
    """``state`` with every object that has a ``state_dict()`` replaced by it."""
    return {k: v.state_dict() if callable(getattr(v, "state_dict", None)) else v for k, v in state.items()}


def restore(checkpoint: Mapping[str, Any], state: Mapping[str, Any], *, where: str = "the checkpoint") -> dict:
    """Load each object of ``state`` that has ``load_state_dict`` from the checkpoint entry of
    the same name, in place; return the checkpoint's other entries (step, epoch, ...).

    A well-formed entry that does not fit this run (an optimizer with other parameter groups,
    a model of other shapes) is a CheckpointError naming ``where`` and the entry."""
    restored = set()
    for key, target in state.items():
        if callable(getattr(target, "load_state_dict", None)):
            if key not in checkpoint:
                raise CheckpointError(f"{where} has no '{key}' state", hint=FRESH_HINT)
            try:
                target.load_state_dict(checkpoint[key])
            except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
                raise CheckpointError(f"the '{key}' state of {where} does not fit this run: "
                                      f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}",
                                      hint=FRESH_HINT) from None
            restored.add(key)
    return {k: v for k, v in checkpoint.items() if k not in restored}


#: What every state holds, and what a state that can resume training (one with an optimizer) holds besides.
STATE_KEYS = ("model",)
TRAINING_KEYS = ("optimizer", "scheduler", "scaler", "epoch", "step", "position", "rng", "strategy", "best_score",
                 "best_step", "history", "run_id")


def _state_problem(state) -> str | None:
    """What makes a loaded state unusable (a sha256 proves it is the file saved, not that a hubkit saved
    it): the wrong type, missing keys, weights that are not tensors, an optimizer state of the wrong shape."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    keys = STATE_KEYS + (TRAINING_KEYS if "optimizer" in state else ())
    missing = [k for k in keys if k not in state]
    if missing:
        return f"missing {', '.join(missing)}"
    model = state["model"]
    if not isinstance(model, dict) or not model or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                           for k, v in model.items()):
        return "'model' is not a mapping of names to tensors"
    if not all(isinstance(state[k], int) and not isinstance(state[k], bool) and state[k] >= 0
               for k in ("epoch", "step", "position") if k in state):
        return "epoch, step and position must be non-negative integers"
    if "optimizer" not in state:
        return None
    optimizer = state["optimizer"]
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    if not isinstance(groups, list) or not groups or not isinstance(optimizer.get("state"), dict) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and all(isinstance(i, int) for i in g["params"])
            for g in groups):
        return "'optimizer' is not an optimizer state (param_groups of parameter ids, and a state)"
    ids = [i for g in groups for i in g["params"]]
    if len(ids) != len(set(ids)) or not set(optimizer["state"]) <= set(ids):
        return "'optimizer' names a parameter twice, or keeps state for parameters it does not optimise"
    if len(ids) > len(model):
        return f"'optimizer' optimises {len(ids)} parameters, the model has {len(model)} tensors"
    for key in ("scheduler", "scaler", "strategy", "history"):
        if not isinstance(state[key], dict):
            return f"'{key}' is not a dict"
    return None


class CheckpointStore:
    """The ``last``/``best`` checkpoints of one run directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def pointer(self, which: str) -> dict | None:
        path = self.directory / which
        if not path.is_file():
            return None
        try:
            data = json.loads(read_capped(path))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"checkpoint pointer {path} is unreadable: {exc}", hint=FRESH_HINT) from None
        file = data.get("file") if isinstance(data, dict) else None
        if not isinstance(file, str) or not file or "/" in file or "\\" in file or file in (".", ".."):
            raise CheckpointError(f"checkpoint pointer {path} is malformed", hint=FRESH_HINT)
        return data

    def write_run(self, record: dict) -> None:
        """Record how the run was started (JSON: its dataset's source, custom weights), beside its checkpoints."""
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.directory / RUN_RECORD, record)

    def read_run(self) -> dict:
        """The run record, or ``{}`` where there is none (a run of an older hubkit); CheckpointError when damaged."""
        path = self.directory / RUN_RECORD
        if not path.is_file():
            return {}
        try:
            record = json.loads(read_capped(path))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"run record {path} is unreadable: {exc}", hint="delete it; give the dataset explicitly") from None
        if not isinstance(record, dict):
            raise CheckpointError(f"run record {path} is malformed", hint="delete it; give the dataset explicitly")
        return record

    def has(self, which: str = LAST) -> bool:
        return (self.directory / which).is_file()

    def check_config(self, config_hash: str, config: dict) -> None:
        """Refuse to resume from (or predict with) a checkpoint made with another configuration."""
        ptr = self.pointer(LAST) or self.pointer(BEST)
        if ptr is None or ptr.get("config_hash") == config_hash:
            return
        old = ptr.get("config", {})
        # the strategy first: a changed strategy explains the settings that changed with it
        changed = sorted((k for k in set(old) | set(config) if old.get(k) != config.get(k)),
                         key=lambda k: (k != "strategy.name", k))
        if changed and all(k in EXTENDABLE and _larger(config.get(k), old.get(k)) for k in changed):
            return  # more epochs: the run continues from its last checkpoint, its schedule stretched to the new length
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in changed[:SHOWN_CHANGES])
        if len(changed) > SHOWN_CHANGES:
            detail += f"; and {len(changed) - SHOWN_CHANGES} more"
        detail = detail or "configuration hash differs"
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
        if hashlib.sha256(data).hexdigest() != ptr.get("sha256"):
            raise CheckpointError(f"{path} does not match the sha256 recorded in '{which}' (damaged)", hint=FRESH_HINT)
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # an unpickling refusal or a damaged archive: both mean "do not use"
            raise CheckpointError(f"{path} cannot be read safely: {str(exc).splitlines()[0][:200]}", hint=FRESH_HINT) from None
        problem = _state_problem(state)
        if problem:
            raise CheckpointError(f"{path} is not a usable training state: {problem}", hint=FRESH_HINT)
        return state

    def save(self, state: dict, *, run_id: str, step: int, config_hash: str, config: dict, best: bool,
             score: float | None = None, metric: str | None = None) -> Path:
        """Write ``state`` durably, then point ``best`` (when ``best``) and ``last`` at it.

        Objects in ``state`` with a ``state_dict()`` (modules, optimizers, :class:`Stateful`)
        are saved as their state dict."""
        self.directory.mkdir(parents=True, exist_ok=True)
        state = _savable(state)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        name = f"{run_id}-step-{step:08d}.pt"
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


def _larger(new, old) -> bool:
    return isinstance(new, int) and isinstance(old, int) and new > old
