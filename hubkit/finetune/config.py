"""``RunConfig``: how long and how fast to train, where to keep checkpoints, which device.

Only the fields that change the trained weights enter the configuration hash a checkpoint
carries (``hashed()``); logging, checkpoint intervals and ``max_steps`` do not, so a run can
be resumed with a different log interval or a later stopping point.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..data.augment import augment_options
from ..errors import ConfigError

OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: Fields that do not change what is learned (excluded from the checkpoint's configuration hash).
UNHASHED = frozenset({"log_interval", "eval_interval", "save_ckpt_interval", "checkpoint_dir", "use_cuda",
                      "max_steps", "max_seconds", "num_workers", "fresh", "skip_bad_files", "progress", "score_test"})
#: Fields added after checkpoints existed: hashed only when set, so older checkpoints still resume.
HASHED_WHEN_SET = frozenset({"augment", "probe_on_validate"})


@dataclass
class RunConfig:
    """Training settings. ``use_cuda=None`` picks CUDA when present; ``input_size`` overrides the
    module's input resolution (small data sets, fast CPU runs); ``max_steps`` stops early (the
    run can be resumed later with the same checkpoint_dir).

    ``augment`` ("light", "strong" or a dict of timm options, see :mod:`hubkit.finetune.augment`)
    transforms the training images randomly, reproducibly per (seed, epoch, image). With a
    frozen backbone the train split's features are then computed from the augmented images
    every epoch instead of read from the feature cache (validate and test stay cached).

    ``max_seconds`` stops training like ``max_steps`` once the run has trained that long (resumable).
    ``score_test=False`` leaves the test split unscored at the end (``--strategy auto`` scores it
    once, on its final choice). Closed-form heads are fitted on train+validate unless
    ``probe_on_validate=False``: then on train alone, and validate scores them."""

    num_epoch: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    log_interval: int = 10
    eval_interval: int = 50
    save_ckpt_interval: int = 100
    checkpoint_dir: str | Path = "ckpt"
    use_cuda: bool | None = None
    seed: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = None
    optimizer: str = "adamw"
    precision: str = "auto"
    input_size: int | None = None
    augment: str | dict | None = None
    max_steps: int | None = None
    max_seconds: float | None = None
    num_workers: int | None = None
    fresh: bool = False
    skip_bad_files: bool = False
    progress: bool = True
    score_test: bool = True
    probe_on_validate: bool | None = None

    def __post_init__(self):
        for name in ("num_epoch", "batch_size", "log_interval", "eval_interval", "save_ckpt_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"RunConfig.{name} must be a positive integer, got {value!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"RunConfig.learning_rate must be positive, got {self.learning_rate!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"RunConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"RunConfig.grad_clip must be positive or None, got {self.grad_clip!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"RunConfig.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"RunConfig.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.input_size is not None and not (isinstance(self.input_size, int) and self.input_size >= 8):
            raise ConfigError(f"RunConfig.input_size must be an integer >= 8, got {self.input_size!r}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"RunConfig.max_steps must be >= 0, got {self.max_steps!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"RunConfig.max_seconds must be positive or None, got {self.max_seconds!r}")
        augment_options(self.augment)
        self.checkpoint_dir = Path(self.checkpoint_dir)

    @property
    def device(self) -> str | None:
        return None if self.use_cuda is None else ("cuda" if self.use_cuda else "cpu")

    def hashed(self) -> dict:
        """The fields that decide the trained weights (what a checkpoint must agree with)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in UNHASHED and not (f.name in HASHED_WHEN_SET and getattr(self, f.name) is None)}


def content_hash(data: Any) -> str:
    """The sha256 of JSON-able ``data`` with its keys sorted (other objects by ``str``): a stable
    key for what trained weights or cached features depend on."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
