"""The learning-rate finder (Smith 2017, as fastai's ``lr_find``): train a few steps with the
learning rate growing exponentially, record the loss, suggest the rate where it falls fastest.

The model's weights are put back afterwards, so a run started after the sweep starts from where
the sweep did. The loss curve is saved as a PNG beside the checkpoints.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ConfigError
from ..hub.fs import atomic_write_bytes
from ..models.device import autocast
from .reporting import figure_png, pyplot
from .strategies import freeze_batchnorm_of_frozen

if TYPE_CHECKING:  # the task calls this module
    from .task import ImageClassifierTask

#: The smoothing of the recorded loss (an exponential moving average, bias-corrected, as fastai's).
SMOOTHING = 0.98
#: The sweep stops once the smoothed loss exceeds this many times its minimum (it diverged).
DIVERGED = 4.0


@dataclass
class LRFinderResult:
    """The sweep: each step's learning rate and smoothed loss, the suggested rate and the curve's PNG."""

    learning_rates: list[float]
    losses: list[float]
    suggested: float
    plot: Path


def find_lr(task: "ImageClassifierTask", *, start: float = 1e-7, end: float = 10.0, steps: int = 100) -> LRFinderResult:
    """Sweep the learning rate from ``start`` to ``end`` over at most ``steps`` training steps
    (the strategy's parameter groups keep their ratios), then restore the weights."""
    if not 0 < start < end or steps < 5:
        raise ConfigError(f"the learning-rate sweep needs 0 < start < end and at least 5 steps, got {start}, {end}, {steps}")
    if task.strategy.head.fitted_on_features:
        raise ConfigError(f"the {task.strategy.head.kind} head is fitted in closed form: it has no learning rate",
                          hint="use the fc or gap_linear head, or a training strategy")
    task.prepare_training()
    saved = copy.deepcopy(task.model.state_dict())
    trained = task.trained_module
    groups = [g for g in task.strategy.param_groups(task.model, 1.0) if g["params"]]  # lr here: each group's ratio
    ratios = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=start, weight_decay=task.config.weight_decay)
    rates, losses, average, best = [], [], 0.0, math.inf
    try:
        for step, (x, y) in enumerate(_batches(task)):
            if step >= steps:
                break
            rate = start * (end / start) ** (step / (steps - 1))
            for group, ratio in zip(optimizer.param_groups, ratios):
                group["lr"] = rate * ratio
            trained.train()
            freeze_batchnorm_of_frozen(task.model)
            with autocast(task.device, task.precision if trained is task.model else "fp32"):
                loss = torch.nn.functional.cross_entropy(trained(task.to_device(x)).float(), torch.as_tensor(y).to(task.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            average = SMOOTHING * average + (1 - SMOOTHING) * float(loss.detach())
            smoothed = average / (1 - SMOOTHING ** (step + 1))
            if not math.isfinite(smoothed):
                break
            rates.append(rate)
            losses.append(smoothed)
            best = min(best, smoothed)
            if smoothed > DIVERGED * best:
                break
    finally:
        task.model.load_state_dict(saved)
    if len(losses) < 3:
        raise ConfigError("the learning-rate sweep diverged at once", hint="start it at a smaller rate")
    suggested = _steepest(rates, losses)
    plot = Path(task.config.checkpoint_dir) / "lr_finder.png"
    atomic_write_bytes(plot, _curve_png(rates, losses, suggested))
    return LRFinderResult(rates, losses, suggested, plot)


def _batches(task: "ImageClassifierTask"):
    """Training batches in the run's shuffled order, epoch after epoch, for as long as the sweep asks."""
    epoch = 0
    encoder = (lambda x: task.frozen_backbone(x)) if task.strategy.uses_feature_cache else None
    while True:
        order = torch.randperm(task.splits.size("train"), generator=torch.Generator().manual_seed(task.config.seed + epoch))
        yield from task.splits.batches("train", order.tolist(), epoch=epoch, encoder=encoder)
        epoch += 1


def _steepest(rates: list[float], losses: list[float]) -> float:
    """The rate where the loss falls fastest against log(rate), before its minimum."""
    lowest = int(np.argmin(losses))
    if lowest < 2:
        return rates[lowest] / 10
    slopes = np.gradient(np.asarray(losses[:lowest + 1]), np.log(rates[:lowest + 1]))
    return float(rates[int(np.argmin(slopes))])


def _curve_png(rates: list[float], losses: list[float], suggested: float) -> bytes:
    fig, ax = pyplot().subplots(figsize=(6, 4))
    ax.plot(rates, losses)
    ax.axvline(suggested, color="red", linestyle="--", label=f"suggested {suggested:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_png(fig)
