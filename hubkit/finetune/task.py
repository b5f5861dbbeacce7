"""``ImageClassifierTask``: fine-tune a hub module on a labelled image dataset.

The task owns the model (backbone + head), the training loop, evaluation, prediction and
export. Training is resumable: every checkpoint holds the complete state (weights,
optimizer, scheduler, AMP scaler, epoch, step, position in the epoch, RNG states, strategy
phase, best score), and the data order is a function of (seed, epoch) only, so a run killed
at any point and resumed ends with the same weights as one never interrupted.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .. import constants
from .._fs import atomic_write_bytes, atomic_write_json
from .._runtime import autocast, resolve_device, resolve_precision, use_channels_last
from ..datasets import BaseDataset, ImageSamples, Sample
from ..errors import CheckpointError, ConfigError, DatasetError, HubkitError, UnknownTapError
from ..manifest import Preprocessing
from . import distributed as dist
from .checkpoint import BEST, LAST, CheckpointStore, _test_kill
from .augment import AugmentedSamples, augment_options
from .config import RunConfig
from .features import cached_features, feature_key
from .metrics import check_metric_names, classification_metrics
from .model import ClassifierModel, cut_channels, freeze_batchnorm_of_frozen
from .strategies import FeatureExtractionStrategy, Strategy, load_weights_by_name

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


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Batches:
    """The batches of one epoch, from ``position`` on: (inputs, labels) from cached features or images.

    With ``epoch`` given and augmentation on, the images are augmented for that epoch (a frozen
    backbone turns them into features batch by batch instead of reading the feature cache)."""

    def __init__(self, task: "ImageClassifierTask", split: str, order: Sequence[int] | None, position: int = 0,
                 shard: bool = False, epoch: int | None = None):
        self.task, self.split = task, split
        self.epoch = epoch if task.train_transform is not None else None
        order = list(range(task._split_size(split))) if order is None else list(order)
        bs = task.config.batch_size
        self.batches = [order[i:i + bs] for i in range(0, len(order), bs)][position:]
        self.padded = [False] * len(self.batches)
        if shard:  # under torchrun: this rank's slice of each global batch
            self.batches, self.padded = dist.shard_batches(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        features = None if self.epoch is not None else self.task._feature_tensors.get(self.split)
        if features is not None:
            x, y = features
            for idx, padded in zip(self.batches, self.padded):
                idx = torch.as_tensor(idx)
                yield x[idx], dist.mask_padding(y[idx], padded)
            return
        if not self.batches:
            return
        from torch.utils.data import DataLoader

        samples = self.task._samples[self.split]
        if self.epoch is None:
            dataset = ImageSamples(samples, self.task.transform)
        else:
            dataset = AugmentedSamples(samples, self.task.train_transform, seed=self.task.config.seed, epoch=self.epoch)
        loader = DataLoader(dataset, batch_sampler=self.batches, num_workers=self.task._num_workers(self.split),
                            generator=torch.Generator().manual_seed(0))
        on_features = self.epoch is not None and self.task.strategy.uses_feature_cache
        for (x, y), padded in zip(loader, self.padded):
            yield (self.task._frozen_features(x) if on_features else x), dist.mask_padding(y, padded)


class ImageClassifierTask:
    """Fine-tune ``module`` on ``dataset`` with a strategy, then evaluate, predict and export.

    >>> task = ImageClassifierTask(Module(name="efficientnet_lite0"), data, config=RunConfig(num_epoch=3),
    ...                            strategy=FeatureExtractionStrategy(head="fc"))
    >>> task.finetune_and_eval().best_score
    """

    def __init__(self, module: Any, dataset: BaseDataset, *, config: RunConfig | None = None,
                 strategy: Strategy | None = None, metrics: Sequence[str] = ("acc", "precision", "recall", "f1")):
        from ..module import Module

        self.config = config or RunConfig()
        dist.setup(self.config.device)  # under torchrun: join the process group (a no-op otherwise)
        if isinstance(module, str):
            with dist.main_process_first():  # one install per node; the other ranks find it installed
                module = Module(name=module)
        self.module = module
        self.dataset = dataset
        self.strategy = strategy or FeatureExtractionStrategy()
        self.metrics = check_metric_names(metrics)
        self.labels = list(dataset.label_list)
        if len(self.labels) < 2:
            raise DatasetError(f"a classifier needs at least 2 classes, the dataset has {len(self.labels)}",
                               hint="add a folder (or label) per class")
        self.device = dist.device_for(resolve_device(self.config.device))
        self.precision = resolve_precision(self.config.precision, self.device)
        pre = self.module.manifest.preprocessing
        if self.config.input_size:
            pre = Preprocessing((3, self.config.input_size, self.config.input_size), pre.interpolation, pre.crop_pct,
                                pre.mean, pre.std)
        self.preprocessing = pre
        from ..module import build_transform

        self.transform = build_transform(pre)
        #: The random training transform (None without ``config.augment``): see hubkit.finetune.augment.
        self.train_transform = (build_transform(pre, training=True, augment=augment_options(self.config.augment))
                                if self.config.augment is not None else None)
        if self.train_transform is not None and self.strategy.head.fitted_on_features:
            raise ConfigError(f"the {self.strategy.head.kind} head is fitted once on extracted features, so it "
                              f"cannot train on augmented images", hint="use the fc or gap_linear head, or augment=None")
        self.store = CheckpointStore(self.config.checkpoint_dir)
        self._samples: dict[str, list[Sample]] = {s: list(dataset.samples(s)) for s in ("train", "validate", "test")}
        self._feature_tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        #: How many splits' backbone features were computed, and how many came from the feature cache.
        self.feature_stats = {"computed": 0, "cached": 0}
        self._data_checked = False
        self._has_model_weights = False
        _seed_everything(self.config.seed)
        self.model = self._build_model()
        self._channels_last = (not self.strategy.uses_feature_cache) and use_channels_last(self.device, self.precision)
        self.model.to(self.device)
        if self._channels_last:
            self.model.to(memory_format=torch.channels_last)

    # --- construction -------------------------------------------------------------------------
    def _build_model(self) -> ClassifierModel:
        ctx = self.module.context(trainable=True, pretrained=self.strategy.pretrained)
        self.features_spec = ctx.features
        backbone, cut_path, in_features = ctx.backbone, None, ctx.features.pooled_channels
        if self.strategy.weights is not None:
            load_weights_by_name(backbone, self.strategy.weights)
        if self.strategy.cut_at is not None:
            try:
                tap = ctx.features.tap(self.strategy.cut_at)
                cut_path, in_features = tap.module, tap.channels
            except UnknownTapError:
                try:
                    backbone.get_submodule(self.strategy.cut_at)
                except AttributeError:
                    taps = ", ".join(t.name for t in ctx.features.taps) or "none"
                    raise ConfigError(f"cannot cut {self.module.manifest.ref} at {self.strategy.cut_at!r}: no such "
                                      f"feature tap or submodule", hint=f"feature taps: {taps}") from None
                cut_path = self.strategy.cut_at
                in_features = cut_channels(backbone, cut_path, self.preprocessing.input_size)
        self.in_features = in_features
        head = self.strategy.head.build(in_features, len(self.labels))
        model = ClassifierModel(backbone, head, cut_path)
        self.strategy.setup(model, ctx.features)
        return model

    def configuration(self) -> dict:
        """Everything the trained weights depend on (its hash is stored in every checkpoint)."""
        m = self.module
        return {"module": m.manifest.ref, "weights_sha256": m.installed.record.get("weights_sha256"),
                "strategy": self.strategy.describe(), "config": self.config.hashed(), "labels": self.labels,
                "preprocessing": self.preprocessing.to_dict(), "train_data": self.dataset.fingerprint("train")}

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.configuration(), sort_keys=True, default=str).encode()).hexdigest()

    def _flat_config(self) -> dict:
        conf = self.configuration()
        flat = {k: v for k, v in conf.items() if k not in ("strategy", "config")}
        flat.update({f"strategy.{k}": v for k, v in conf["strategy"].items()})
        flat.update(conf["config"])
        return json.loads(json.dumps(flat, default=str))

    # --- data ----------------------------------------------------------------------------------
    def check_data(self) -> None:
        """Validate the dataset before anything is trained or overwritten.

        Structural problems (fewer than 2 classes, an empty train split, a class without
        usable images) always stop; bad files (unreadable images, bad list lines) stop unless
        ``config.skip_bad_files``, which drops them."""
        if self._data_checked:
            return
        report = self.dataset.validate()
        structural = [i for i in report.issues
                      if i.origin in ("split", "labels") or (i.split == "train" and i.origin in self.labels)]
        per_file = [i for i in report.issues if i not in structural]
        fatal = structural + ([] if self.config.skip_bad_files else per_file)
        if fatal:
            shown = "; ".join(str(i) for i in fatal[:5]) + (f"; and {len(fatal) - 5} more" if len(fatal) > 5 else "")
            hint = "fix the data set" + (" or skip unreadable files (skip_bad_files=True, --skip-bad-files)"
                                         if per_file and not self.config.skip_bad_files else "")
            raise DatasetError(f"the data set cannot be trained on: {shown}", hint=hint)
        bad_files = {(i.split, i.origin) for i in per_file}
        for split, origin in bad_files:
            self._samples[split] = [s for s in self._samples[split] if s.origin != origin]
        if not self._samples["train"]:
            raise DatasetError("the train split is empty after removing unreadable files", hint="fix the data set")
        self._data_checked = True

    @property
    def eval_split(self) -> str | None:
        return "validate" if self._samples["validate"] else ("test" if self._samples["test"] else None)

    def _split_size(self, split: str) -> int:
        if split in self._feature_tensors:
            return len(self._feature_tensors[split][1])
        return len(self._samples[split])

    def _num_workers(self, split: str) -> int:
        if self.config.num_workers is not None:
            return self.config.num_workers
        samples = self._samples[split]
        if len(samples) < 256 or all(isinstance(s.source, np.ndarray) for s in samples[:50]):
            return 0  # in-memory arrays, or a few files, decode faster than a worker process starts
        return min(4, max(0, (os.cpu_count() or 1) - 1))

    def _extract(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features of a split (read from the feature cache, or computed once and stored)."""
        from .._cache import Cache

        m = self.module
        key = feature_key(module=m.manifest.ref, weights_sha256=m.installed.record.get("weights_sha256"),
                          preprocessing=self.preprocessing.to_dict(), cut_at=self.model.cut_at,
                          custom_weights=self.strategy.describe()["weights_sha256"], precision=self.precision,
                          data=self._fingerprint(split))

        def compute():
            from torch.utils.data import DataLoader

            loader = DataLoader(ImageSamples(self._samples[split], self.transform), batch_size=max(32, self.config.batch_size),
                                num_workers=self._num_workers(split), generator=torch.Generator().manual_seed(0))
            xs, ys = [], []
            with torch.inference_mode():
                for x, y in self._progress(loader, f"features {split}"):
                    xs.append(self._frozen_features(x).cpu())
                    ys.append(y)
            return torch.cat(xs), torch.cat(ys)

        with dist.main_process_first():  # computed once per node, read from the cache by the other ranks
            features, labels, hit = cached_features(Cache(m.cache.root).features_dir, key, compute)
        self.feature_stats["cached" if hit else "computed"] += 1
        return features, labels

    def _fingerprint(self, split: str) -> str:
        """The dataset's fingerprint of a split, adjusted when unreadable files were skipped."""
        base = self.dataset.fingerprint(split)
        if len(self._samples[split]) == len(self.dataset.samples(split)):
            return base
        return hashlib.sha256((base + "|" + "|".join(s.origin for s in self._samples[split])).encode()).hexdigest()

    def _to_device(self, x: torch.Tensor, channels_last: bool | None = None) -> torch.Tensor:
        """``x`` on this task's device, channels_last when the model takes it (or when told to)."""
        x = x.to(self.device, non_blocking=True)
        if (self._channels_last if channels_last is None else channels_last) and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's pooled features of an image batch, computed as the feature cache's are."""
        extractor, channels_last = self._feature_extractor
        with torch.no_grad(), autocast(self.device, self.precision):
            return extractor.forward_features(self._to_device(x, channels_last)).float()

    @functools.cached_property
    def _feature_extractor(self) -> tuple[ClassifierModel, bool]:
        """An inference copy of the frozen backbone (BatchNorms folded, channels_last where that
        helps) and whether it takes channels_last input. A copy, because ``self.model`` keeps
        timm's structure for checkpoints and export; the frozen weights never change, so it
        stays in step."""
        import copy

        from .._optimize import fold_batchnorm_for_input

        extractor = ClassifierModel(copy.deepcopy(self.model.backbone), nn.Identity(), self.model.cut_at)
        extractor.eval().requires_grad_(False)
        fold_batchnorm_for_input(extractor.backbone, self.preprocessing.input_size, self.device,
                                 keep={self.model.cut_at} - {None})
        channels_last = use_channels_last(self.device, self.precision)
        if channels_last:
            extractor.to(memory_format=torch.channels_last)
        return extractor, channels_last

    def _progress(self, iterable, desc: str, total: int | None = None, initial: int = 0):
        from tqdm.auto import tqdm

        disable = constants.HUBKIT_DISABLE_PROGRESS or not self.config.progress or not dist.is_main()
        return tqdm(iterable, desc=desc, total=total, initial=initial, disable=disable, leave=False, dynamic_ncols=True)

    # --- training --------------------------------------------------------------------------------
    @property
    def _trainable(self) -> nn.Module:
        """What the optimizer updates and the loop calls: the head alone on cached features, else the model."""
        return self.model.head if self.strategy.uses_feature_cache else self.model

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = [g for g in self.strategy.param_groups(self.model, self.config.learning_rate) if g["params"]]
        for g in groups:
            g["initial_lr"] = g["lr"]
        wd = self.config.weight_decay
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.config.learning_rate, momentum=0.9, weight_decay=wd)
        return torch.optim.AdamW(groups, lr=self.config.learning_rate, weight_decay=wd)

    def finetune_and_eval(self) -> FinetuneResult:
        """Train with periodic evaluation, keep the best model (by the first metric), return its metrics.

        Resumes automatically from ``config.checkpoint_dir`` when it holds a checkpoint of the
        same configuration; refuses one of another configuration unless ``config.fresh``.
        With ``config.augment`` a frozen backbone sees the augmented training images each epoch
        (their features are not cached; validate and test features are)."""
        self.check_data()
        config_hash, flat = self.config_hash(), self._flat_config()
        resume = dist.run_on_main(lambda: self._can_resume(config_hash, flat))  # rank 0's checkpoint decides
        if self.strategy.uses_feature_cache:
            augmented = ("train",) if self.train_transform is not None else ()  # its features change every epoch
            for split in ("train", "validate", "test"):
                if self._samples[split] and split not in augmented:
                    self._feature_tensors[split] = self._extract(split)
        if self.strategy.head.fitted_on_features:
            return self._fit_on_features(config_hash, flat)
        return _TrainingRun(self, config_hash, flat, resume).run()

    def _can_resume(self, config_hash: str, flat: dict) -> bool:
        resume = self.store.has(LAST) and not self.config.fresh
        if resume:
            self.store.check_config(config_hash, flat)
        return resume

    def _fit_on_features(self, config_hash: str, flat: dict) -> FinetuneResult:
        """Heads solved in closed form on cached features (the linear SVM): fit, save, evaluate."""
        x, y = self._feature_tensors["train"]
        if "validate" in self._feature_tensors:
            x = torch.cat([x, self._feature_tensors["validate"][0]])
            y = torch.cat([y, self._feature_tensors["validate"][1]])
        weight, bias = self.strategy.head.fit(x.numpy(), y.numpy(), len(self.labels), seed=self.config.seed)
        with torch.no_grad():
            self.model.head.weight.copy_(torch.from_numpy(weight))
            self.model.head.bias.copy_(torch.from_numpy(bias))
        self._has_model_weights = True
        split = self.eval_split
        metrics = self.evaluate(split) if split else {}
        score = metrics.get(self.metrics[0])
        state = {"format": CHECKPOINT_FORMAT, "config_hash": config_hash, "model": self.model_state(),
                 "run_id": uuid.uuid4().hex[:8], "epoch": 0, "step": 0, "position": 0, "best_score": score,
                 "best_step": 0, "labels": self.labels, "strategy": {"svm_C": self.strategy.head.best_C},
                 "history": {"train": [], "eval": []}}
        if dist.is_main():
            self.store.save(state, run_id=state["run_id"], step=0, config_hash=config_hash, config=flat, best=True,
                            score=score, metric=self.metrics[0])
        _write_reports(self.config.checkpoint_dir, {"train": [], "eval": []},
                       {"metric": self.metrics[0], "best_score": score, "best_step": 0, "metrics": metrics,
                        "svm": {"C": self.strategy.head.best_C, "cv_score": self.strategy.head.cv_score}})
        return FinetuneResult(self.metrics[0], score, 0, metrics, 0, 0, Path(self.config.checkpoint_dir))

    # --- using the trained model -------------------------------------------------------------------
    def _ensure_model(self) -> None:
        """Load the best checkpoint when this task has not trained (or loaded) a model itself."""
        if self._has_model_weights:
            return
        if not self.store.has(BEST):
            raise _no_best_model(self.config.checkpoint_dir)
        self.store.check_config(self.config_hash(), self._flat_config())
        self.load_checkpoint(BEST)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint stores: the whole model, or only the head when the backbone is
        frozen (the frozen backbone is the module's own weights, which the configuration hash
        pins, so storing it again would only make every save slower)."""
        if self.strategy.uses_feature_cache:
            return {f"head.{k}": v for k, v in self.model.head.state_dict().items()}
        return self.model.state_dict()

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put checkpoint weights (the whole model's, or the head's alone) into ``self.model``."""
        head_only = self.strategy.uses_feature_cache and state and all(k.startswith("head.") for k in state)
        try:
            if head_only:
                self.model.head.load_state_dict({k[len("head."):]: v for k, v in state.items()})
            else:
                self.model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"the checkpoint weights do not fit this task's model: {str(exc).splitlines()[0]}",
                                  hint="use the checkpoint_dir of this configuration, or start over with fresh=True") from None

    def load_checkpoint(self, which: str = BEST) -> dict:
        """Put the weights of the ``best`` (or ``last``) checkpoint into ``self.model``."""
        state = self.store.load(which)
        self.load_model_state(state["model"])
        self._has_model_weights = True
        return state

    @torch.no_grad()
    def _logits(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        trainable = self._trainable
        trainable.eval()
        if self.strategy.uses_feature_cache and split not in self._feature_tensors and self._samples[split]:
            self._feature_tensors[split] = self._extract(split)
        dist.sync_buffers(trainable)  # under torchrun: every rank evaluates with rank 0's BatchNorm statistics
        outs, ys = [], []
        with torch.inference_mode(), autocast(self.device, self.precision if trainable is self.model else "fp32"):
            for x, y in _Batches(self, split, dist.shard(range(self._split_size(split)))):
                outs.append(trainable(self._to_device(x)).float().cpu())
                ys.append(torch.as_tensor(y))
        logits, labels = dist.gather_cat(outs), dist.gather_cat(ys)  # each rank ran its shard; all get the whole split
        if logits is None:
            raise DatasetError(f"the {split} split is empty", hint="evaluate a split that has images")
        return logits, labels

    def evaluate(self, split: str = "test") -> dict:
        """Loss, accuracy, macro precision/recall/F1, confusion matrix and per-class report on a split."""
        if split not in self._samples:
            raise ConfigError(f"unknown split {split!r}", hint="use train, validate or test")
        self._ensure_model()
        logits, labels = self._logits(split)
        result = classification_metrics(labels.numpy(), logits.argmax(1).numpy(), self.labels)
        result["loss"] = float(nn.functional.cross_entropy(logits, labels))
        result["split"], result["images"] = split, int(len(labels))
        return result

    def predict(self, inputs: Any, *, top_k: int = 1, batch_size: int | None = None, errors: str = "raise") -> list:
        """Top-k labels with probabilities for images (paths, a folder, PIL images or arrays).

        ``errors="collect"`` reports unreadable inputs in ``Prediction.error`` and predicts the rest.
        """
        from .._images import load_image
        from ..module import predict_batches

        self._ensure_model()
        self.model.eval()

        def prepare(item):
            try:
                return self.transform(load_image(item))
            except HubkitError as exc:
                return exc

        def forward(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), autocast(self.device, self.precision):
                return self.model(self._to_device(batch)).float().softmax(1).cpu()

        return predict_batches(inputs, prepare=prepare, collate=torch.stack, forward=forward, labels=self.labels,
                               top_k=top_k, batch_size=batch_size or self.config.batch_size, errors=errors)

    def export(self, directory: str | Path, *, name: str | None = None, version: str = "1.0.0",
               summary: str | None = None) -> Path:
        """Write the best model as a module folder that ``hub install`` and ``Module`` accept."""
        from .export import export_module

        self._ensure_model()
        return export_module(self, directory, name=name, version=version, summary=summary)


def _no_best_model(directory) -> CheckpointError:
    return CheckpointError(f"no best model in {directory}: nothing was trained there yet",
                           hint="run task.finetune_and_eval() (or hub finetune) with this checkpoint_dir first")


class _TrainingRun:
    """One call of ``finetune_and_eval``: the loop, its state, checkpoints and reports."""

    def __init__(self, task: ImageClassifierTask, config_hash: str, flat: dict, resume: bool):
        self.task, self.config_hash, self.flat, self.resume = task, config_hash, flat, resume
        self.config = task.config
        self.metric = task.metrics[0]

    def run(self) -> FinetuneResult:
        task, cfg = self.task, self.config
        steps_per_epoch = len(_Batches(task, "train", None))
        total_steps = cfg.num_epoch * steps_per_epoch
        optimizer = task._make_optimizer()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, task.strategy.lr_lambda(total_steps))
        scaler = torch.amp.GradScaler(task.device.type, enabled=task.precision == "fp16" and task.device.type == "cuda")
        epoch = step = position = 0
        best_score, best_step, resumed_from = None, None, None
        history: dict = {"train": [], "eval": []}
        window: list[tuple[float, float]] = []  # (loss, accuracy) of the batches since the last log line
        run_id = uuid.uuid4().hex[:8]
        if self.resume:
            state = dist.run_on_main(lambda: task.store.load(LAST))  # read by rank 0, sent to every rank
            task.load_model_state(state["model"])
            task.strategy.load_state_dict(task.model, state["strategy"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            epoch, step, position = state["epoch"], state["step"], state["position"]
            best_score, best_step, history, run_id = state["best_score"], state["best_step"], state["history"], state["run_id"]
            _set_rng_state(dist.rng_for_this_rank(state["rng"], state.get("rng_ranks")))
            window[:] = [tuple(w) for w in state.get("log_window", [])]
            resumed_from = step
        else:
            _seed_everything(dist.rank_seed(cfg.seed))
        task._has_model_weights = True
        writer = _summary_writer(cfg.checkpoint_dir)

        def save(is_best: bool) -> None:
            rng_ranks = dist.gather_rng(_rng_state())  # every rank's random state, for an exact resume
            if not dist.is_main():
                return
            state = {"format": CHECKPOINT_FORMAT, "config_hash": self.config_hash, "run_id": run_id,
                     "model": task.model_state(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
                     "position": position, "rng": _rng_state(), "strategy": task.strategy.state_dict(),
                     "best_score": best_score, "best_step": best_step, "history": history, "labels": task.labels,
                     "log_window": [list(w) for w in window]}
            if rng_ranks:
                state["rng_ranks"] = rng_ranks
            task.store.save(state, run_id=run_id, step=step, config_hash=self.config_hash, config=self.flat,
                            best=is_best, score=best_score, metric=self.metric)

        trainable = task._trainable
        replicated = dist.Replicated(trainable, task.device, find_unused_parameters=task.model.cut_at is not None)
        eval_split = task.eval_split
        stop = cfg.max_steps is not None and step >= cfg.max_steps
        bar = task._progress(None, "finetune", total=total_steps, initial=step)
        try:
            while epoch < cfg.num_epoch and not stop:
                task.strategy.on_epoch_start(task.model, epoch)
                forward = replicated.current()  # DistributedDataParallel under torchrun
                order = torch.randperm(task._split_size("train"), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
                for x, y in _Batches(task, "train", order.tolist(), position, shard=True, epoch=epoch):
                    trainable.train()
                    freeze_batchnorm_of_frozen(task.model)
                    x, y = task._to_device(x), torch.as_tensor(y).to(task.device)
                    with autocast(task.device, task.precision if trainable is task.model else "fp32"):
                        logits = forward(x)
                        loss, batch_loss, batch_acc = dist.batch_loss(logits.float(), y)
                        penalty = task.strategy.penalty(task.model)
                        total = loss if penalty is None else loss + penalty
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(total).backward()
                    if cfg.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    step += 1
                    position += 1
                    bar.update(1)
                    _test_kill(f"step:{step}")
                    _test_kill(f"rank{dist.rank()}:step:{step}")
                    window.append((batch_loss, batch_acc))
                    if step % cfg.log_interval == 0:
                        train_loss, train_acc = (float(np.mean(v)) for v in zip(*window))
                        window.clear()
                        history["train"].append({"step": step, "epoch": epoch, "loss": train_loss, "acc": train_acc,
                                                 "lr": optimizer.param_groups[-1]["lr"]})
                        writer.add_scalar("train/loss", train_loss, step)
                        writer.add_scalar("train/acc", train_acc, step)
                        writer.add_scalar("train/lr", optimizer.param_groups[-1]["lr"], step)
                        if penalty is not None:
                            writer.add_scalar("train/l2_sp", float(penalty), step)
                        bar.set_postfix(loss=f"{train_loss:.3f}")
                    end_of_epoch = position == steps_per_epoch
                    improved = False
                    if eval_split and (step % cfg.eval_interval == 0 or end_of_epoch):
                        result = task.evaluate(eval_split)
                        history["eval"].append({"step": step, "epoch": epoch, "loss": result["loss"],
                                                **{m: result[m] for m in task.metrics}})
                        for m in ("loss", *task.metrics):
                            writer.add_scalar(f"{eval_split}/{m}", result[m], step)
                        if best_score is None or result[self.metric] > best_score:
                            best_score, best_step, improved = result[self.metric], step, True
                    if end_of_epoch:
                        epoch, position = epoch + 1, 0
                    stop = cfg.max_steps is not None and step >= cfg.max_steps
                    finished = epoch >= cfg.num_epoch
                    if improved or end_of_epoch or stop or step % cfg.save_ckpt_interval == 0:
                        if not eval_split and finished:
                            best_score, best_step, improved = None, step, True
                        save(improved)
                    if stop:
                        break
        finally:
            bar.close()
            writer.close()
        if best_step is None:
            save(True)  # stopped before any evaluation (e.g. max_steps): the current model is the best known
        task.load_model_state(dist.run_on_main(lambda: task.store.load(BEST))["model"])
        metrics = task.evaluate(eval_split) if eval_split else {}
        summary = {"metric": self.metric, "best_score": best_score, "best_step": best_step, "steps": step,
                   "epochs_completed": epoch, "eval_split": eval_split, "metrics": metrics,
                   "configuration": task.configuration()}
        distributed = dist.describe(task.feature_stats)
        if distributed:
            summary["distributed"] = distributed
        _write_reports(cfg.checkpoint_dir, history, summary)
        return FinetuneResult(self.metric, best_score, best_step, metrics, step, epoch, Path(cfg.checkpoint_dir),
                              resumed_from, history)


class _NoWriter:
    """What ranks other than 0 log to: nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _summary_writer(directory: Path):
    if not dist.is_main():
        return _NoWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(directory) / "tensorboard"))


def _write_reports(directory: Path, history: dict, summary: dict) -> None:
    """metrics.json (summary + history) and curves.png (train vs validation loss and accuracy); rank 0 only."""
    if not dist.is_main():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "metrics.json", json.loads(json.dumps({**summary, "history": history}, default=str)))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in (("train", history.get("train", [])), ("validation", history.get("eval", []))):
        if rows:
            steps = [r["step"] for r in rows]
            ax_loss.plot(steps, [r["loss"] for r in rows], marker="." if len(rows) < 30 else None, label=name)
            if "acc" in rows[0]:
                ax_acc.plot(steps, [r["acc"] for r in rows], marker="." if len(rows) < 30 else None, label=name)
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(directory / "curves.png", buffer.getvalue())
