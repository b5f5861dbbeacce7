"""The training loop of ``ImageClassifierTask.finetune_and_eval``, and the closed-form fit of the linear probes.

Every checkpoint holds the complete state (weights, optimizer, scheduler, AMP scaler, the
:class:`Progress` of the run, RNG states, strategy phase), and the data order is a function of
(seed, epoch) only, so a run killed at any point and resumed ends with the same weights as one
never interrupted.
"""
from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from ..data.augment import global_rng_state, seed_globally, set_global_rng_state
from ..models.device import autocast
from . import distributed as dist
from .checkpoint import BEST, LAST, Stateful, restore
from .config import RunConfig
from .reporting import TrainingLog, write_reports
from .strategies import Strategy, freeze_batchnorm_of_frozen

if TYPE_CHECKING:  # the task imports this module; the loop only calls its public methods
    from .task import ImageClassifierTask

CHECKPOINT_FORMAT = 1


@dataclass
class FinetuneResult:
    """What ``finetune_and_eval`` returns: the best model's score and metrics, and the run's history."""

    metric: str
    best_score: float | None
    best_step: int | None
    metrics: dict
    steps: int
    epochs: int
    checkpoint_dir: Path
    resumed_from_step: int | None = None
    history: dict = field(default_factory=dict, repr=False)
    #: For heads fitted in closed form: kind, chosen C, its cross-validation accuracy and folds, the
    #: splits it was fitted on. None for trained heads.
    fit: dict | None = None
    #: The best model's metrics on the test split, scored once at the end ({} without a test split;
    #: for a run that picked its best step on test, ``metrics`` already are these).
    test_metrics: dict = field(default_factory=dict)
    #: For LP-FT: the linear probe the run started from (its C, CV accuracy, validation accuracy).
    probe: dict | None = None


@dataclass
class Progress:
    """Where a run stands, saved in every checkpoint beside the weights and the optimizer state."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    epoch: int = 0
    step: int = 0
    position: int = 0  # batches done in the current epoch
    best_score: float | None = None
    best_step: int | None = None
    history: dict = field(default_factory=lambda: {"train": [], "eval": []})
    log_window: list = field(default_factory=list)  # (loss, accuracy) of the batches since the last log line
    epoch_window: list = field(default_factory=list)  # ... and since the epoch began (its mean goes on the curves)

    def to_checkpoint(self) -> dict:
        return {"run_id": self.run_id, "epoch": self.epoch, "step": self.step, "position": self.position,
                "best_score": self.best_score, "best_step": self.best_step, "history": self.history,
                "log_window": [list(w) for w in self.log_window], "epoch_window": [list(w) for w in self.epoch_window]}

    @classmethod
    def from_checkpoint(cls, saved: Mapping[str, Any]) -> "Progress":
        return cls(saved["run_id"], saved["epoch"], saved["step"], saved["position"], saved["best_score"],
                   saved["best_step"], saved["history"], [tuple(w) for w in saved.get("log_window", [])],
                   [tuple(w) for w in saved.get("epoch_window", [])])


def make_optimizer(strategy: Strategy, model: torch.nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """The optimizer over the strategy's parameter groups (each at its own learning rate)."""
    groups = [g for g in strategy.param_groups(model, config.learning_rate) if g["params"]]
    for g in groups:
        g["initial_lr"] = g["lr"]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)


class TrainingLoop:
    """One call of ``finetune_and_eval``: epochs of training steps, periodic evaluation, checkpoints.

    Made with ``resume``, it restores the state of the ``last`` checkpoint (read by rank 0);
    otherwise it seeds this rank's random streams from ``config.seed``."""

    def __init__(self, task: "ImageClassifierTask", *, config_hash: str, config_fields: dict, resume: bool):
        self.task, self.config = task, task.config
        self.config_hash, self.config_fields = config_hash, config_fields
        self.metric = task.metrics[0]
        self.steps_per_epoch = len(task.splits.batches("train"))
        self.total_steps = self.config.num_epoch * self.steps_per_epoch
        self.optimizer = make_optimizer(task.strategy, task.model, self.config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, task.strategy.lr_lambda(self.total_steps))
        self.scaler = torch.amp.GradScaler(task.device.type, enabled=task.precision == "fp16" and task.device.type == "cuda")
        self.progress = Progress()
        self.resumed_from: int | None = None
        if resume:
            self._resume()
        else:
            seed_globally(dist.rank_seed(self.config.seed))
        self.trained = task.trained_module
        self.replicated = dist.Replicated(self.trained, task.device, find_unused_parameters=task.model.cut_at is not None)
        self.eval_split = task.eval_split
        self.started = time.monotonic()  # for config.max_seconds

    def _stateful(self) -> dict:
        """What a checkpoint saves and restores through ``state_dict`` / ``load_state_dict``."""
        task = self.task
        return {"model": Stateful(task.model_state, task.load_model_state),
                "strategy": Stateful(task.strategy.state_dict, functools.partial(task.strategy.load_state_dict, task.model)),
                "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}

    def _resume(self) -> None:
        saved = restore(dist.run_on_main(lambda: self.task.store.load(LAST)), self._stateful(),
                        where=f"the last checkpoint in {self.task.store.directory}")  # sent to every rank
        self.progress = Progress.from_checkpoint(saved)
        set_global_rng_state(dist.rng_for_this_rank(saved["rng"], saved.get("rng_ranks")))
        self.resumed_from = self.progress.step

    def save(self, best: bool) -> None:
        """Checkpoint the complete state (rank 0 writes it, with every rank's random state)."""
        rng_ranks = dist.gather_rng(global_rng_state())  # a collective: every rank takes part
        if not dist.is_main():
            return
        p = self.progress
        state = {"format": CHECKPOINT_FORMAT, "config_hash": self.config_hash, **self._stateful(),
                 **p.to_checkpoint(), "rng": global_rng_state(), "labels": self.task.labels}
        if rng_ranks:
            state["rng_ranks"] = rng_ranks
        self.task.store.save(state, run_id=p.run_id, step=p.step, config_hash=self.config_hash,
                             config=self.config_fields, best=best, score=p.best_score, metric=self.metric)

    def _stopped(self) -> bool:
        cfg = self.config
        if cfg.max_seconds is not None and time.monotonic() - self.started >= cfg.max_seconds:
            return True
        return cfg.max_steps is not None and self.progress.step >= cfg.max_steps

    def run(self) -> FinetuneResult:
        """Train to ``num_epoch`` (or ``max_steps``), then evaluate the best checkpoint and write the reports."""
        log = TrainingLog(self.config.checkpoint_dir, total_steps=self.total_steps, initial_step=self.progress.step,
                          show_progress=self.config.progress)
        try:
            while self.progress.epoch < self.config.num_epoch and not self._stopped():
                self._run_epoch(log)
        finally:
            log.close()
        if self.progress.best_step is None:
            self.save(True)  # stopped before any evaluation (e.g. max_steps): the current model is the best known
        return self._finish()

    def _run_epoch(self, log: TrainingLog) -> None:
        """The epoch's remaining batches, in the order given by (seed, epoch), until it ends or the run stops."""
        task, p = self.task, self.progress
        task.strategy.on_epoch_start(task.model, p.epoch)
        forward = self.replicated.module_to_call()  # DistributedDataParallel under torchrun
        order = torch.randperm(task.splits.size("train"),
                               generator=torch.Generator().manual_seed(self.config.seed * 100_003 + p.epoch))
        batches = task.splits.batches("train", order.tolist(), position=p.position, shard=True, epoch=p.epoch,
                                      encoder=(lambda x: task.frozen_backbone(x)) if task.strategy.uses_feature_cache else None)
        for x, y in batches:
            penalty = self.train_step(forward, x, y)
            log.step_done()
            if self._after_step(log, penalty):
                return

    def train_step(self, forward: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """One optimizer step on a batch; returns the strategy's penalty term (L2-SP) when it has one."""
        task, cfg = self.task, self.config
        self.trained.train()
        freeze_batchnorm_of_frozen(task.model)
        x, y = task.to_device(x), torch.as_tensor(y).to(task.device)
        with autocast(task.device, task.precision if self.trained is task.model else "fp32"):
            logits = forward(x)
            loss, batch_loss, batch_acc = dist.batch_loss(logits.float(), y)
            penalty = task.strategy.penalty(task.model)
            total = loss if penalty is None else loss + penalty
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.progress.step += 1
        self.progress.position += 1
        self.progress.log_window.append((batch_loss, batch_acc))
        self.progress.epoch_window.append((batch_loss, batch_acc))
        return penalty

    def _after_step(self, log: TrainingLog, penalty: torch.Tensor | None) -> bool:
        """Log, evaluate and checkpoint as the intervals say; True when the run stops here."""
        cfg, p = self.config, self.progress
        if p.step % cfg.log_interval == 0:
            self._log_training(log, penalty)
        end_of_epoch = p.position == self.steps_per_epoch
        improved = False
        if self.eval_split and (p.step % cfg.eval_interval == 0 or end_of_epoch):
            improved = self._evaluate(log)
        if end_of_epoch:
            loss, acc = (float(np.mean(v)) for v in zip(*p.epoch_window))
            p.history.setdefault("train_epoch", []).append({"step": p.step, "epoch": p.epoch, "loss": loss, "acc": acc})
            p.epoch_window.clear()
            p.epoch, p.position = p.epoch + 1, 0
        stop = self._stopped()
        if improved or end_of_epoch or stop or p.step % cfg.save_ckpt_interval == 0:
            if not self.eval_split and p.epoch >= cfg.num_epoch:
                p.best_score, p.best_step, improved = None, p.step, True
            self.save(improved)
        return stop

    def _log_training(self, log: TrainingLog, penalty: torch.Tensor | None) -> None:
        p = self.progress
        loss, acc = (float(np.mean(v)) for v in zip(*p.log_window))
        p.log_window.clear()
        record = {"step": p.step, "epoch": p.epoch, "loss": loss, "acc": acc, "lr": self.optimizer.param_groups[-1]["lr"]}
        p.history["train"].append(record)
        log.train(p.step, record, None if penalty is None else float(penalty))

    def _evaluate(self, log: TrainingLog) -> bool:
        """Evaluate on the eval split, record it; True when the score beats the best so far."""
        task, p = self.task, self.progress
        result = task.evaluate(self.eval_split)
        p.history["eval"].append({"step": p.step, "epoch": p.epoch, "loss": result["loss"],
                                  **{m: result[m] for m in task.metrics}})
        log.evaluation(self.eval_split, p.step, result, task.metrics)
        if p.best_score is None or result[self.metric] > p.best_score:
            p.best_score, p.best_step = result[self.metric], p.step
            return True
        return False

    def _finish(self) -> FinetuneResult:
        """Load the best weights, evaluate and diagnose them, write the reports (metrics.json, figures, report.html)."""
        task, p = self.task, self.progress
        task.load_model_state(dist.run_on_main(lambda: task.store.load(BEST))["model"])
        # the test split is scored once, here, by the model chosen without it
        metrics, test, diagnosis = task.final_evaluation(
            self.eval_split, test=bool(task.splits.samples["test"]) and self.eval_split != "test" and self.config.score_test)
        summary = {"metric": self.metric, "best_score": p.best_score, "best_step": p.best_step, "steps": p.step,
                   "epochs_completed": p.epoch, "eval_split": self.eval_split, "metrics": metrics,
                   "test_metrics": test, "probe": task.strategy.state_dict().get("probe"),
                   "configuration": task.configuration()}
        distributed = dist.run_summary(task.feature_stats)
        if distributed:
            summary["distributed"] = distributed
        write_reports(self.config.checkpoint_dir, p.history, summary, diagnosis)
        return FinetuneResult(self.metric, p.best_score, p.best_step, metrics, p.step, p.epoch,
                              Path(self.config.checkpoint_dir), self.resumed_from, p.history, test_metrics=test,
                              probe=summary["probe"])


def fit_on_features(task: "ImageClassifierTask", *, config_hash: str, config_fields: dict) -> FinetuneResult:
    """Heads solved in closed form on cached features (SVM, logistic): fitted on train+validate
    (train alone with ``config.probe_on_validate=False``), their regularisation chosen by their own
    cross-validation. The score reported is that CV accuracy; the metrics are validate's when it
    was held out, else test's: never data the head was fitted on."""
    features, config = task.splits.features, task.config
    fitted_on = [s for s in ("train", "validate") if s in features and (s == "train" or config.probe_on_validate is not False)]
    x = torch.cat([features[s][0] for s in fitted_on])
    y = torch.cat([features[s][1] for s in fitted_on])
    head = task.strategy.head
    weight, bias = head.fit(x.numpy(), y.numpy(), len(task.labels), seed=config.seed, class_names=task.labels)
    with torch.no_grad():
        task.model.head.weight.copy_(torch.from_numpy(weight))
        task.model.head.bias.copy_(torch.from_numpy(bias))
    fit = {**head.summary(), "fitted_on": fitted_on, "images": int(len(y))}
    held_out = "validate" if "validate" in features and "validate" not in fitted_on else None
    validate, test, diagnosis = task.final_evaluation(held_out, test=bool(task.splits.samples["test"]) and config.score_test)
    metrics = validate or test
    progress = Progress(best_score=head.cv_score, best_step=0)
    state = {"format": CHECKPOINT_FORMAT, "config_hash": config_hash, "model": task.model_state(),
             **progress.to_checkpoint(), "labels": task.labels, "strategy": {"fit": fit}}
    if dist.is_main():
        task.store.save(state, run_id=progress.run_id, step=0, config_hash=config_hash, config=config_fields, best=True,
                        score=head.cv_score, metric="cv_acc")
    write_reports(config.checkpoint_dir, progress.history,
                  {"metric": "cv_acc", "best_score": head.cv_score, "best_step": 0, "fit": fit,
                   "eval_split": metrics.get("split"), "metrics": metrics, "test_metrics": test}, diagnosis)
    return FinetuneResult("cv_acc", head.cv_score, 0, metrics, 0, 0, Path(config.checkpoint_dir), fit=fit,
                          test_metrics=test)
