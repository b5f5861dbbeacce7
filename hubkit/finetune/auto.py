"""``--strategy auto``: try strategies on the validation split within a time budget, cheapest
first, keep the best, and score the test split once, on that final choice only.

With several backbones (``backbones=``, ``hub finetune --backbones``), they are ranked first by
:func:`hubkit.finetune.advise.rank_backbones` (a cross-validated linear probe of each one's
features on a bounded sample; its time counts against the budget), and the candidates below
train on the best; ``backbones.json`` records the ranking, so a resumed run keeps the choice.

The candidates, in order:

1. ``logistic``: a logistic-regression linear probe on the frozen pooled feature (fitted on the
   train split, C by cross-validation), scored on validate;
2. ``svm``: the same with a linear SVM;
3. ``lpft``: LP-FT (the logistic probe, then everything fine-tuned from it at a small learning
   rate, light augmentation) for as many epochs as the time left allows, stopped at the budget.

Before each candidate its cost is estimated from the backbone's measured speed here (features
already in the feature cache cost nothing); a candidate that cannot finish in the time left is
skipped, and the leaderboard says so. A winning probe is refitted on train+validate (its C
chosen again by CV) before the test split is scored. Every candidate trains in its own folder
under ``checkpoint_dir``, and ``auto.json`` there records each finished one: started again on
the same folder, an interrupted auto run does not rerun them (an interrupted LP-FT resumes
from its last checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..data.datasets import BaseDataset, ImageSamples
from ..errors import ConfigError, DatasetError
from ..hub.fs import atomic_write_bytes, read_capped
from ..models.heads import LogisticHead, SVMHead
from .advise import BackboneScore, rank_backbones
from .config import RunConfig
from .strategies import LPFT, FeatureExtractionStrategy, Strategy
from .task import ImageClassifierTask

#: The file in ``checkpoint_dir`` that records an auto run's finished candidates.
STATE_FILE = "auto.json"
#: The file in ``checkpoint_dir`` that records the backbone ranking of an auto run given several.
BACKBONES_FILE = "backbones.json"
#: auto.json is ours, but read back all the same: bounded before it is parsed.
MAX_STATE_BYTES = 1 << 20
#: A training step costs about this many forward passes of its images (forward, backward, update).
TRAIN_COST = 3.5
#: Seconds a probe's fit takes per (image x feature), measured on a loaded 2-core CPU (clothing-small:
#: 3,068 x 1280 in about 15 s), so that a plan errs on the safe side.
FIT_SECONDS_PER_ENTRY = 4e-6
#: LP-FT's epochs at most (its cosine schedule spans them), and its learning rate before LPFT's 0.1.
LPFT_MAX_EPOCHS = 10
LPFT_LEARNING_RATE = 3e-3
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|min)?\s*$")


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``"15m"``, ``"90s"``, ``"1.5h"`` or a plain number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise ConfigError(f"cannot read the time budget {text!r}", hint="write it like 15m, 900s or 1.5h")
        seconds = float(match.group(1)) * {"s": 1, None: 1, "m": 60, "min": 60, "h": 3600}[match.group(2)]
    if not seconds > 0 or math.isinf(seconds):
        raise ConfigError(f"the time budget must be a positive duration, got {text!r}")
    return seconds


@dataclass
class Candidate:
    """One row of the leaderboard."""

    name: str
    #: done, stopped (the budget ended its training; its best model so far is scored), skipped (no
    #: time), running (recorded while it trains: an interrupted run resumes it with the same plan)
    status: str
    validate_acc: float | None = None
    seconds: float = 0.0
    note: str = ""
    #: What it was run with (LP-FT's epochs), so that a resumed auto run rebuilds the same run.
    plan: dict = dataclasses.field(default_factory=dict)


@dataclass
class AutoResult:
    """What ``auto_finetune`` returns: the leaderboard, the final choice and its one test score."""

    leaderboard: list[Candidate]
    best: str | None
    #: The final model's task (predict, evaluate, export); None when no candidate finished.
    task: ImageClassifierTask | None
    test_metrics: dict
    budget_seconds: float
    seconds: float
    checkpoint_dir: Path
    #: How the final model was fitted (a probe refitted on train+validate says so).
    final_note: str = ""
    #: The backbones ranked before the candidates trained (best first), when several were given.
    backbones: list[BackboneScore] = dataclasses.field(default_factory=list)


class _Clock:
    def __init__(self, budget: float, now: Callable[[], float]):
        self.now, self.start, self.budget = now, now(), budget

    def left(self) -> float:
        return self.budget - (self.now() - self.start)


def auto_finetune(module: Any, dataset: BaseDataset, *, time_budget: str | float, config: RunConfig | None = None,
                  backbones: Sequence[Any] = (), now: Callable[[], float] = time.monotonic) -> AutoResult:
    """Try the candidates cheapest first within ``time_budget`` (seconds or ``"15m"``), keep the
    one with the best validation accuracy, score test once on it, and return the leaderboard.

    ``config`` gives the checkpoint folder, device, batch size, input size and seed; auto chooses
    the rest. ``backbones``: more modules to consider; with them, ``module`` and they are ranked
    first and the candidates train on the best. A budget too small for any candidate raises
    ``ConfigError`` saying what the cheapest needs (after keeping the best candidate an earlier,
    interrupted run finished, if any)."""
    clock = _Clock(parse_duration(time_budget), now)
    config = config or RunConfig()
    if not dataset.samples("validate"):
        raise DatasetError("--strategy auto compares its candidates on the validation split, and this data set has none",
                           hint="add a validation split (a validation/ folder, or a split column), or choose a strategy")
    root = Path(config.checkpoint_dir)
    ranking: list[BackboneScore] = []
    if backbones:
        module, ranking = _best_backbone([module, *backbones], dataset, root)
    state = _read_state(root)
    board: list[Candidate] = []
    speed: dict[str, float] = {}
    for name, make in _CANDIDATES:
        done = state.get(name)
        if done and done.get("status") in ("done", "stopped"):
            board.append(Candidate(**{**done, "note": (done.get("note") or "") + " (finished earlier)"}))
            continue
        def record(running: Candidate) -> None:  # a plan is on disk before its training starts
            _write_state(root, [*board, running])

        board.append(make(module, dataset, config, root / name, clock, speed, done, record))
        if board[-1].status != "skipped":
            _write_state(root, board)
    finished = [c for c in board if c.status in ("done", "stopped") and c.validate_acc is not None]
    if not finished:
        cheapest = board[0]
        raise ConfigError(f"a time budget of {clock.budget:.0f} s is too small for any candidate: {cheapest.note}",
                          hint="give a larger --time-budget, or choose a strategy yourself")
    best = max(finished, key=lambda c: c.validate_acc)  # ties: the cheaper, earlier candidate
    task, note = _final_task(module, dataset, config, root, best, clock)
    test = task.evaluate("test") if task.splits.samples["test"] else {}
    result = AutoResult(board, best.name, task, test, clock.budget, clock.budget - clock.left(), root, note, ranking)
    _write_state(root, board, best=best.name, test=test, final=note)
    return result


# --- the candidates ------------------------------------------------------------------------------
def _probe(kind: str):
    def run(module, dataset, config, folder, clock, speed, previous, record) -> Candidate:
        head = LogisticHead() if kind == "logistic" else SVMHead()
        task = ImageClassifierTask(module, dataset, strategy=FeatureExtractionStrategy(head=head),
                                   config=_candidate_config(config, folder, probe_on_validate=False, augment=None))
        uncached = sum(len(task.splits.samples[s]) for s in task.splits.samples if not task.features_cached(s))
        width = task.in_features
        need = uncached * _seconds_per_image(task, speed) + FIT_SECONDS_PER_ENTRY * len(task.splits.samples["train"]) * width
        if need > clock.left():
            return Candidate(kind, "skipped", note=f"the {kind} probe needs about {need:.0f} s here "
                                                   f"({uncached} images to encode, then the fit), {max(0, clock.left()):.0f} s left")
        started = clock.now()
        result = task.finetune_and_eval()
        return Candidate(kind, "done", result.metrics["acc"], clock.now() - started,
                         f"C={result.fit['C']:g}, {result.fit['cv_folds']}-fold CV acc {result.fit['cv_acc']:.4f} on train")
    return run


def _lpft(module, dataset, config, folder, clock, speed, previous, record) -> Candidate:
    where = dict(config=config, folder=folder)
    plan = (previous or {}).get("plan") or {}
    task = None
    if not plan:
        task = _lpft_task(module, dataset, where, epochs=1)
        per_image = _seconds_per_image(task, speed)
        samples = task.splits.samples
        epoch = per_image * (TRAIN_COST * len(samples["train"]) + len(samples["validate"]))
        reserve = per_image * (len(samples["test"]) + len(samples["validate"]))  # final scoring
        usable = clock.left() - reserve
        if usable < epoch:
            return Candidate("lpft", "skipped", note=f"one epoch of LP-FT needs about {epoch:.0f} s here, "
                                                     f"{max(0, clock.left()):.0f} s left")
        plan = {"epochs": int(min(LPFT_MAX_EPOCHS, usable // epoch))}
    if task is None or plan["epochs"] != 1:
        task = _lpft_task(module, dataset, where, epochs=plan["epochs"])
    task.config.max_seconds = max(1.0, clock.left() - _final_reserve(task, speed))
    record(Candidate("lpft", "running", plan=plan))
    started = clock.now()
    result = task.finetune_and_eval()
    stopped = result.epochs < plan["epochs"]
    return Candidate("lpft", "stopped" if stopped else "done", result.metrics["acc"], clock.now() - started,
                     f"{result.epochs}/{plan['epochs']} epochs, best at step {result.best_step}"
                     + (" (stopped by the budget)" if stopped else ""), plan)


_CANDIDATES = (("logistic", _probe("logistic")), ("svm", _probe("svm")), ("lpft", _lpft))


def _lpft_task(module, dataset, where: dict, epochs: int) -> ImageClassifierTask:
    """The LP-FT candidate's task: ``where`` holds the auto run's config and the candidate's folder."""
    config = _candidate_config(where["config"], where["folder"], num_epoch=epochs, learning_rate=LPFT_LEARNING_RATE,
                               augment="light", eval_interval=10**9)
    return ImageClassifierTask(module, dataset, config=config, strategy=_lpft_strategy())


def _lpft_strategy() -> Strategy:
    return LPFT(head=LogisticHead())


def _candidate_config(config: RunConfig, folder: Path, **changes) -> RunConfig:
    return dataclasses.replace(config, checkpoint_dir=folder, score_test=False, max_steps=None, max_seconds=None,
                               fresh=False, **changes)


def _seconds_per_image(task: ImageClassifierTask, speed: dict) -> float:
    """The frozen backbone's seconds per image here, decoding included (measured once on a batch)."""
    if "image" not in speed:
        encode, samples = task.frozen_backbone, ImageSamples(task.splits.samples["train"][:17], task.transform)
        with torch.inference_mode():
            encode(samples[0][0][None])  # the first call pays one-time set-up costs
            started = time.perf_counter()  # in this process: a loader's worker would time its own start
            encode(torch.stack([samples[i][0] for i in range(1, len(samples))]))
        speed["image"] = (time.perf_counter() - started) / max(1, len(samples) - 1)
    return speed["image"]


def _final_reserve(task: ImageClassifierTask, speed: dict) -> float:
    """Time kept back for scoring the final choice on validate and test."""
    samples = task.splits.samples
    return _seconds_per_image(task, speed) * (len(samples["validate"]) + len(samples["test"]))


# --- the final choice ------------------------------------------------------------------------------
def _final_task(module, dataset, config: RunConfig, root: Path, best: Candidate, clock: _Clock):
    """The task holding the final model: a winning probe refitted on train+validate when there is
    time (its C chosen again by CV), else the candidate's own best checkpoint."""
    if best.name in ("logistic", "svm"):
        head = LogisticHead() if best.name == "logistic" else SVMHead()
        refit = ImageClassifierTask(module, dataset, strategy=FeatureExtractionStrategy(head=head),
                                    config=_candidate_config(config, root / f"{best.name}-final", probe_on_validate=True,
                                                             augment=None))
        train, validate = len(refit.splits.samples["train"]), len(refit.splits.samples["validate"])
        need = best.seconds * (train + validate) / train  # its features are cached by now: the fit, a little larger
        if need <= clock.left():
            fit = refit.finetune_and_eval().fit
            return refit, f"the {best.name} probe refitted on train+validate (C={fit['C']:g})"
        task = ImageClassifierTask(module, dataset, strategy=FeatureExtractionStrategy(head=head),
                                   config=_candidate_config(config, root / best.name, probe_on_validate=False, augment=None))
        return task, f"the {best.name} probe fitted on train (no time left to refit it on train+validate)"
    task = _lpft_task(module, dataset, dict(config=config, folder=root / best.name), epochs=best.plan["epochs"])
    return task, "LP-FT's best checkpoint on validate"


# --- auto.json -------------------------------------------------------------------------------------
def _best_backbone(modules: list, dataset: BaseDataset, root: Path) -> tuple[Any, list[BackboneScore]]:
    """The best of ``modules`` by :func:`rank_backbones`, and the ranking; a ranking of the same modules
    that an earlier run on ``root`` recorded is kept (a resumed run must not change backbone)."""
    by_ref = {m.manifest.ref: m for m in modules}
    path = root / BACKBONES_FILE
    if path.is_file():
        try:
            recorded = [BackboneScore(**row) for row in json.loads(read_capped(path, MAX_STATE_BYTES))["ranking"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not an auto run's backbone ranking ({exc})",
                              hint="use another --checkpoint_dir, or delete the file to rank the backbones again") from None
        if sorted(r.module for r in recorded) == sorted(by_ref):
            return by_ref[recorded[0].module], recorded
    ranking = rank_backbones(dataset, modules)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"ranking": [r.to_dict() for r in ranking]}, indent=2).encode())
    return by_ref[ranking[0].module], ranking


def _read_state(root: Path) -> dict:
    """{candidate name: its recorded row} from an earlier run on this folder ({} when none)."""
    path = root / STATE_FILE
    if not path.is_file():
        return {}
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
        rows = json.loads(path.read_text(encoding="utf-8"))["candidates"]
        fields = {f.name for f in dataclasses.fields(Candidate)}
        return {row["name"]: {k: v for k, v in row.items() if k in fields} for row in rows
                if isinstance(row, dict) and row.get("name") in dict(_CANDIDATES)}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not an auto run's record ({exc})",
                          hint="use another --checkpoint_dir, or delete the file to start the auto run over") from None


def _write_state(root: Path, board: list[Candidate], **final) -> None:
    root.mkdir(parents=True, exist_ok=True)
    data = {"candidates": [dataclasses.asdict(c) for c in board if c.status != "skipped"], **final}
    atomic_write_bytes(root / STATE_FILE, json.dumps(data, indent=2).encode())
