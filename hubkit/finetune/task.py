"""``ImageClassifierTask``: fine-tune a hub module on a labelled image dataset.

The task owns the model (backbone + head), the data it trains on (:mod:`.batches`),
evaluation, prediction and export. Training itself, resumable from any checkpoint, is
:class:`.loop.TrainingLoop`; what a run reports is :mod:`.reporting`.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data.augment import augment_options, seed_globally
from ..data.datasets import STRUCTURE, BaseDataset, LabelSet, open_dataset
from ..data.images import load_image
from ..data.transforms import build_transform
from ..errors import CheckpointError, ConfigError, DatasetError, HubkitError, UnknownTapError
from ..hub.cache import Cache
from ..hub.manifest import Preprocessing, parse_ref
from ..inference.module import Module
from ..inference.predict import mirror_averaged, predict_batches
from ..models.classifier import ClassifierModel, cut_channels
from ..models.device import autocast, resolve_device, resolve_precision, use_channels_last
from . import distributed as dist
from .batches import SplitData
from .checkpoint import BEST, LAST, RUN_RECORD, CheckpointStore
from .config import UNHASHED, RunConfig, content_hash
from .diagnosis import Diagnosis, diagnose
from .export import export_module
from .feature_cache import FrozenBackbone, cached_features, cached_features_path
from .loop import FinetuneResult, TrainingLoop, fit_on_features
from .lr_finder import LRFinderResult, find_lr
from .metrics import check_metric_names, classification_metrics
from .reporting import progress_bar
from .strategies import FeatureExtractionStrategy, Strategy, load_weights_by_name, strategy_from_settings

__all__ = ["ImageClassifierTask", "FinetuneResult"]


class ImageClassifierTask:
    """Fine-tune ``module`` on ``dataset`` with a strategy, then evaluate, predict and export.

    >>> task = ImageClassifierTask(Module(name="efficientnet_lite0"), data, config=RunConfig(num_epoch=3),
    ...                            strategy=FeatureExtractionStrategy(head="fc"))
    >>> task.finetune_and_eval().best_score
    """

    def __init__(self, module: Any, dataset: BaseDataset, *, config: RunConfig | None = None,
                 strategy: Strategy | None = None, metrics: Sequence[str] = ("acc", "precision", "recall", "f1")):
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
        self.preprocessing = self._preprocessing()
        self.transform = build_transform(self.preprocessing)
        #: The random training transform (None without ``config.augment``): see hubkit.data.augment.
        self.train_transform = (build_transform(self.preprocessing, training=True,
                                                augment=augment_options(self.config.augment))
                                if self.config.augment is not None else None)
        if self.train_transform is not None and self.strategy.head.fitted_on_features:
            raise ConfigError(f"the {self.strategy.head.kind} head is fitted once on extracted features, so it "
                              f"cannot train on augmented images", hint="use the fc or gap_linear head, or augment=None")
        self.store = CheckpointStore(self.config.checkpoint_dir)
        #: The samples of each split (less what ``check_data`` dropped) and their extracted features.
        self.splits = SplitData(dataset, self.transform, self.train_transform, batch_size=self.config.batch_size,
                                seed=self.config.seed, num_workers=self.config.num_workers)
        #: How many splits' backbone features were computed, and how many came from the feature cache.
        self.feature_stats = {"computed": 0, "cached": 0}
        #: The test-time augmentation ``choose_tta`` kept ("flip") or None; exported with the model.
        self.tta: str | None = None
        #: What ``choose_tta`` measured (None until it has run).
        self.tta_choice: dict | None = None
        self._data_checked = False
        self._has_model_weights = False
        seed_globally(self.config.seed)
        self.model = self._build_model()
        self._channels_last = (not self.strategy.uses_feature_cache) and use_channels_last(self.device, self.precision)
        self.model.to(self.device)
        if self._channels_last:
            self.model.to(memory_format=torch.channels_last)

    # --- construction -------------------------------------------------------------------------
    def _preprocessing(self) -> Preprocessing:
        """The module's preprocessing, at ``config.input_size`` when one is set."""
        pre = self.module.manifest.preprocessing
        if not self.config.input_size:
            return pre
        size = self.config.input_size
        return Preprocessing((3, size, size), pre.interpolation, pre.crop_pct, pre.mean, pre.std)

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

    @classmethod
    def from_run(cls, run_dir: str | Path, dataset: BaseDataset | None = None, *,
                 device: str | None = None) -> "ImageClassifierTask":
        """The task a finished run trained, its best model loaded, from the run's checkpoint folder
        (``config.checkpoint_dir``): to evaluate or predict without exporting (``hub evaluate`` / ``hub predict``).

        The module, strategy, settings and class names are the best checkpoint's record. The data is
        ``dataset``, else the one the run opened from a path (its ``run.json``), else the class names
        alone (enough to predict). Raises CheckpointError when ``run_dir`` holds no usable best model,
        DatasetError when the data's classes are not the run's."""
        store = CheckpointStore(run_dir)
        pointer = store.pointer(BEST)
        if pointer is None:
            raise _no_best_model(run_dir)
        recorded = pointer.get("config")
        if not (isinstance(recorded, dict) and isinstance(recorded.get("module"), str)
                and isinstance(recorded.get("labels"), list) and all(isinstance(x, str) for x in recorded["labels"])):
            raise CheckpointError(f"the best checkpoint in {run_dir} does not record its module and classes",
                                  hint="it was made by an older hubkit: export it from the Python task that trained it")
        run = store.read_run()
        strategy = strategy_from_settings(recorded, weights=run.get("strategy_weights"))
        settings = {f.name: recorded[f.name] for f in fields(RunConfig) if f.name in recorded and f.name not in UNHASHED}
        config = RunConfig(**settings, checkpoint_dir=run_dir, progress=False,
                           use_cuda={None: None, "auto": None, "cpu": False}.get(device, True))
        if dataset is None:
            source = run.get("dataset")
            reopenable = isinstance(source, dict) and isinstance(source.get("path"), str) and Path(source["path"]).exists()
            try:
                dataset = open_dataset(**source) if reopenable else LabelSet(recorded["labels"])
            except TypeError:
                raise CheckpointError(f"the dataset recorded in {store.directory / RUN_RECORD} is malformed",
                                      hint="give the dataset explicitly (hub evaluate RUN_DIR --dataset PATH)") from None
        if list(dataset.label_list) != recorded["labels"]:
            raise DatasetError(f"the dataset's classes ({', '.join(dataset.label_list[:5])}...) are not the ones "
                               f"the run in {run_dir} was trained on", hint="give the dataset the run trained on")
        name, version = parse_ref(recorded["module"])
        task = cls(Module(name=name, version=version, device=device), dataset, config=config, strategy=strategy)
        rebuilt = task.configuration_fields()
        differ = sorted(k for k in recorded if k != "train_data" and recorded[k] != rebuilt.get(k))
        if differ:
            raise CheckpointError(f"the run in {run_dir} cannot be rebuilt as it was trained: {', '.join(differ)} "
                                  f"differ", hint="evaluate it with the hubkit version that trained it")
        task.load_checkpoint(BEST)
        return task

    def configuration(self) -> dict:
        """Everything the trained weights depend on (its hash is stored in every checkpoint)."""
        m = self.module
        return {"module": m.manifest.ref, "weights_sha256": m.installed.record.get("weights_sha256"),
                "strategy": self.strategy.settings(), "config": self.config.hashed(), "labels": self.labels,
                "preprocessing": self.preprocessing.to_dict(), "train_data": self.dataset.fingerprint("train")}

    def config_hash(self) -> str:
        return content_hash(self.configuration())

    def configuration_fields(self) -> dict:
        """The configuration as one level of keys (``strategy.head``, ``learning_rate``...), JSON only:
        recorded beside each checkpoint, so that a refused resume can say which field changed."""
        conf = self.configuration()
        fields = {k: v for k, v in conf.items() if k not in ("strategy", "config")}
        fields.update({f"strategy.{k}": v for k, v in conf["strategy"].items()})
        fields.update(conf["config"])
        return json.loads(json.dumps(fields, default=str))

    # --- data ----------------------------------------------------------------------------------
    def check_data(self) -> None:
        """Validate the dataset before anything is trained or overwritten.

        Structural problems (fewer than 2 classes, an empty train split, a class without
        usable images) always stop; bad files (unreadable images, bad list lines) stop unless
        ``config.skip_bad_files``, which drops them."""
        if self._data_checked:
            return
        report = self.dataset.validate()
        structural = [i for i in report.issues if i.kind == STRUCTURE]
        per_file = [i for i in report.issues if i.kind != STRUCTURE]
        fatal = structural + ([] if self.config.skip_bad_files else per_file)
        if fatal:
            shown = "; ".join(str(i) for i in fatal[:5]) + (f"; and {len(fatal) - 5} more" if len(fatal) > 5 else "")
            hint = "fix the data set" + (" or skip unreadable files (skip_bad_files=True, --skip-bad-files)"
                                         if per_file and not self.config.skip_bad_files else "")
            raise DatasetError(f"the data set cannot be trained on: {shown}", hint=hint)
        bad_files = {(i.split, i.origin) for i in per_file}
        for split in {split for split, _ in bad_files}:
            self.splits.drop(split, {origin for s, origin in bad_files if s == split})
        if not self.splits.samples["train"]:
            raise DatasetError("the train split is empty after removing unreadable files", hint="fix the data set")
        self._data_checked = True

    @property
    def eval_split(self) -> str | None:
        """The split evaluated during training: validate, else test, else none."""
        samples = self.splits.samples
        return "validate" if samples["validate"] else ("test" if samples["test"] else None)

    def _feature_key(self, split: str) -> str:
        """The feature cache's key of a split: everything its backbone features depend on."""
        m = self.module
        return content_hash(dict(module=m.manifest.ref, weights_sha256=m.installed.record.get("weights_sha256"),
                                 preprocessing=self.preprocessing.to_dict(), cut_at=self.model.cut_at,
                                 custom_weights=self.strategy.settings()["weights_sha256"], precision=self.precision,
                                 data=self._fingerprint(split)))

    def features_cached(self, split: str) -> bool:
        """Whether the feature cache already holds this split's backbone features (so a frozen run
        will not compute them): ``--strategy auto`` plans its time with it."""
        return cached_features_path(Cache(self.module.cache.root).features_dir, self._feature_key(split)).is_file()

    def _extract_features(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features of a split (read from the feature cache, or computed once and stored)."""
        m = self.module
        key = self._feature_key(split)

        def compute():
            loader = self.splits.image_loader(split, max(32, self.config.batch_size))
            xs, ys = [], []
            with torch.inference_mode():
                for x, y in progress_bar(loader, f"features {split}", enabled=self.config.progress):
                    xs.append(self.frozen_backbone(x).cpu())
                    ys.append(y)
            return torch.cat(xs), torch.cat(ys)

        with dist.main_process_first():  # computed once per node, read from the cache by the other ranks
            features, labels, hit = cached_features(Cache(m.cache.root).features_dir, key, compute)
        self.feature_stats["cached" if hit else "computed"] += 1
        return features, labels

    def _fingerprint(self, split: str) -> str:
        """The dataset's fingerprint of a split, adjusted when unreadable files were skipped."""
        base = self.dataset.fingerprint(split)
        samples = self.splits.samples[split]
        if len(samples) == len(self.dataset.samples(split)):
            return base
        return hashlib.sha256((base + "|" + "|".join(s.origin for s in samples)).encode()).hexdigest()

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on this task's device, channels_last when the model takes it."""
        x = x.to(self.device, non_blocking=True)
        if self._channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @functools.cached_property
    def frozen_backbone(self) -> FrozenBackbone:
        """The frozen backbone's features of image batches, computed as the feature cache's are."""
        return FrozenBackbone(self.model, self.preprocessing.input_size, self.device, self.precision, module=self.module,
                              identity={"weights_sha256": self.strategy.settings()["weights_sha256"]})

    # --- training --------------------------------------------------------------------------------
    @property
    def trained_module(self) -> nn.Module:
        """What the optimizer updates and the loop calls: the head alone on cached features, else the model."""
        return self.model.head if self.strategy.uses_feature_cache else self.model

    def finetune_and_eval(self) -> FinetuneResult:
        """Train with periodic evaluation, keep the best model (by the first metric), return its metrics.

        Resumes automatically from ``config.checkpoint_dir`` when it holds a checkpoint of the
        same configuration; refuses one of another configuration unless ``config.fresh``.
        With ``config.augment`` a frozen backbone sees the augmented training images each epoch
        (their features are not cached; validate and test features are)."""
        self.check_data()
        config_hash, config_fields = self.config_hash(), self.configuration_fields()
        resume = dist.run_on_main(lambda: self._can_resume(config_hash, config_fields))  # rank 0's checkpoint decides
        if dist.is_main():
            weights = self.strategy.weights
            self.store.write_run({"dataset": self.dataset.source,
                                  "strategy_weights": str(Path(weights).resolve()) if weights else None})
        self.prepare_training()
        if self.strategy.head.fitted_on_features:
            self._has_model_weights = True
            return fit_on_features(self, config_hash=config_hash, config_fields=config_fields)
        if not resume:
            self.strategy.prepare(self.model, lambda split: self._extract_features(split) if self.splits.samples[split] else None,
                                  self.labels, self.config.seed)
        loop = TrainingLoop(self, config_hash=config_hash, config_fields=config_fields, resume=resume)
        self._has_model_weights = True  # the model holds the weights being trained: evaluate must not load `best`
        return loop.run()

    def prepare_training(self) -> None:
        """Check the data, and with a frozen backbone have each split's features at hand (from
        the feature cache, or computed once)."""
        self.check_data()
        if self.strategy.uses_feature_cache:
            augmented = ("train",) if self.train_transform is not None else ()  # its features change every epoch
            for split, samples in self.splits.samples.items():
                if samples and split not in augmented and split not in self.splits.features:
                    self.splits.features[split] = self._extract_features(split)

    def find_lr(self, *, start: float = 1e-7, end: float = 10.0, steps: int = 100) -> LRFinderResult:
        """A short learning-rate sweep (see :mod:`.lr_finder`): the loss curve saved as
        ``checkpoint_dir/lr_finder.png`` and a suggested rate. The weights are put back after it."""
        return find_lr(self, start=start, end=end, steps=steps)

    def _can_resume(self, config_hash: str, config_fields: dict) -> bool:
        resume = self.store.has(LAST) and not self.config.fresh
        if resume:
            self.store.check_config(config_hash, config_fields)
        return resume

    # --- using the trained model -------------------------------------------------------------------
    def _ensure_model(self) -> None:
        """Load the best checkpoint when this task has not trained (or loaded) a model itself."""
        if self._has_model_weights:
            return
        if not self.store.has(BEST):
            raise _no_best_model(self.config.checkpoint_dir)
        self.store.check_config(self.config_hash(), self.configuration_fields())
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
        trained = self.trained_module
        trained.eval()
        if self.strategy.uses_feature_cache and split not in self.splits.features and self.splits.samples[split]:
            self.splits.features[split] = self._extract_features(split)
        dist.sync_buffers(trained)  # under torchrun: every rank evaluates with rank 0's BatchNorm statistics
        outs, ys = [], []
        with torch.inference_mode(), autocast(self.device, self.precision if trained is self.model else "fp32"):
            for x, y in self.splits.batches(split, dist.shard(range(self.splits.size(split)))):
                outs.append(trained(self.to_device(x)).float().cpu())
                ys.append(torch.as_tensor(y))
        logits, labels = dist.gather_cat(outs), dist.gather_cat(ys)  # each rank ran its shard; all get the whole split
        if logits is None:
            raise DatasetError(f"the {split} split is empty", hint="evaluate a split that has images")
        return logits, labels

    def evaluate(self, split: str = "test", *, tta: bool | None = None) -> dict:
        """Loss, accuracy, macro precision/recall/F1, confusion matrix and per-class report on a split.

        ``tta``: as for :meth:`predict`."""
        return self._evaluate(split, mirrored=self._tta(tta))[0]

    def _evaluate(self, split: str, *, mirrored: bool = False) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """``evaluate``'s metrics, and the logits (log-probabilities with TTA) and labels they were computed from."""
        if split not in self.splits.samples:
            raise ConfigError(f"unknown split {split!r}", hint="use train, validate or test")
        if isinstance(self.dataset, LabelSet):
            raise DatasetError(f"no data to evaluate on: the dataset the run in {self.config.checkpoint_dir} was "
                               f"trained on is not where it was", hint="give it: hub evaluate RUN_DIR --dataset PATH")
        self._ensure_model()
        logits, labels = self._mirror_averaged_logits(split) if mirrored else self._logits(split)
        result = classification_metrics(labels.numpy(), logits.argmax(1).numpy(), self.labels)
        result["loss"] = float(nn.functional.cross_entropy(logits, labels))
        result["split"], result["images"] = split, int(len(labels))
        return result, logits, labels

    def final_evaluation(self, split: str | None, *, test: bool) -> tuple[dict, dict, Diagnosis | None]:
        """The end of a run: the metrics of ``split`` (None: no split), those of the test split when ``test``,
        and on rank 0 the diagnosis (:mod:`.diagnosis`) of the last split scored, from the same logits."""
        scored = {s: self._evaluate(s) for s in (split, "test" if test else None) if s}
        diagnosis = None
        if scored and dist.is_main():
            last, (result, logits, labels) = list(scored.items())[-1]
            diagnosis = diagnose(self, last, logits, labels, result["confusion_matrix"])
        metrics = scored[split][0] if split else {}
        return metrics, (scored["test"][0] if test else {}), diagnosis

    # --- test-time augmentation ---------------------------------------------------------------------
    def choose_tta(self, split: str = "validate") -> dict:
        """Keep the flip test-time augmentation (each image and its mirror image, probabilities averaged)
        only when it scores better than plain prediction on ``split``: ``predict``, ``evaluate`` and
        ``export`` then use it. Returns both accuracies and the choice (``"flip"`` or None)."""
        if not self.splits.samples.get(split):
            raise DatasetError(f"test-time augmentation is chosen on the {split} split, and it is empty",
                               hint="add a validation split, or leave test-time augmentation off")
        plain, flip = (self._evaluate(split, mirrored=mirrored)[0]["acc"] for mirrored in (False, True))
        self.tta = "flip" if flip > plain else None
        self.tta_choice = {"split": split, "plain_acc": plain, "flip_acc": flip, "chosen": self.tta}
        return self.tta_choice

    def _tta(self, asked: bool | None) -> bool:
        """Whether to average over mirror images: ``True`` chooses on validate first (once), ``None``
        follows the choice made so far (none by default), ``False`` never."""
        if asked and self.tta_choice is None:
            self.choose_tta()
        return bool(asked is not False and self.tta)

    def _mirror_averaged_logits(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Log of the class probabilities averaged over each image and its mirror image, and the labels.
        The whole model sees the images (a frozen backbone's cached features are of the unmirrored ones)."""
        self.model.eval()
        probs, ys = [], []
        forward = self._forward(mirrored=True)
        with torch.inference_mode():
            for x, y in self.splits.image_loader(split, self.config.batch_size):
                probs.append(forward(x))
                ys.append(torch.as_tensor(y))
        return torch.cat(probs).clamp_min(1e-12).log(), torch.cat(ys)

    def _forward(self, *, mirrored: bool):
        """The model's class probabilities of an image batch, averaged with its mirror image's when ``mirrored``."""
        return mirror_averaged(self._probabilities, lambda batch: batch.flip(-1)) if mirrored else self._probabilities

    def _probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return self.model(self.to_device(batch)).float().softmax(1).cpu()

    def predict(self, inputs: Any, *, top_k: int = 1, batch_size: int | None = None, errors: str = "raise",
                tta: bool | None = None) -> list:
        """Top-k labels with probabilities for images (paths, a folder, PIL images or arrays).

        ``errors="collect"`` reports unreadable inputs in ``Prediction.error`` and predicts the rest.
        ``tta=True`` averages each image with its mirror image when that helps on the validation split
        (:meth:`choose_tta`, run once); ``None`` follows the choice made so far; ``False`` never.
        """
        self._ensure_model()
        self.model.eval()

        def prepare(item):
            try:
                return self.transform(load_image(item))
            except HubkitError as exc:
                return exc

        probabilities = self._forward(mirrored=self._tta(tta))

        def forward(batch: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return probabilities(batch)

        return predict_batches(inputs, prepare=prepare, collate=torch.stack, forward=forward, labels=self.labels,
                               top_k=top_k, batch_size=batch_size or self.config.batch_size, errors=errors)

    def export(self, directory: str | Path, *, name: str | None = None, version: str = "1.0.0",
               summary: str | None = None) -> Path:
        """Write the best model as a module folder that ``hub install`` and ``Module`` accept."""
        self._ensure_model()
        return export_module(self, directory, name=name, version=version, summary=summary)


def _no_best_model(directory) -> CheckpointError:
    return CheckpointError(f"no best model in {directory}: nothing was trained there yet",
                           hint="run task.finetune_and_eval() (or hub finetune) with this checkpoint_dir first")
