"""Which transfer-learning strategy suits a dataset, measured with the module's own features.

The classic rule of thumb (Yosinski et al. 2014, "How transferable are features in deep neural
networks?"; the CS231n transfer-learning notes) crosses two questions:

==================  ==========================================  ======================================
                    similar to the pretraining data             different from it
==================  ==========================================  ======================================
small dataset       frozen feature extractor + linear head      freeze the first blocks, fine-tune
                                                                from a middle feature tap
large dataset       fine-tune the top blocks                    fine-tune the whole network
==================  ==========================================  ======================================

"Small" is measured as images per class in the train split. "Similar" is measured on a bounded
sample of the train split (``max_per_class`` images per class) with one forward pass of the
module, three ways: how well a cross-validated nearest-centroid probe separates the classes on
the pooled features (skill above chance: 0 is chance, 1 is perfect; too low means different
data); how much better that probe does on the pooled features than on a middle feature tap
(Yosinski's finding: top-layer features help only on data like the pretraining data; on
digits or 25x25 faces the middle tap does as well); and how confident the module's own
ImageNet head is on the images (mean max-softmax). Measured on efficientnet_lite0 with 10
images per class: clothing photos gain +37% with a confidence of 0.48; scikit-learn digits
+13 to +21% and 0.10; LFW faces vs non-faces -5 to +5% and 0.14. Similar data must pass all three.

Which backbone, before which strategy: ``rank_backbones`` scores candidates on the same bounded
sample by a cross-validated logistic-regression probe of their pooled features (the transfer-
learning literature's measure of frozen features), with their parameters and speed here.
"""
from __future__ import annotations

import math
import os
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.datasets import BaseDataset, ImageSamples, Sample
from ..errors import ConfigError, DatasetError, HubkitError
from ..models.features import capture, global_average_pool
from ..models.heads import LogisticHead
from .strategies import STRATEGIES

#: Strategy class names in :mod:`hubkit.finetune.strategies`; ``Advice.kwargs`` are their arguments.
FEATURE_EXTRACTION = "FeatureExtractionStrategy"
FREEZE_FIRST_K = "FreezeFirstK"
FULL_FINETUNE = "FullFineTune"


@dataclass(frozen=True)
class Thresholds:
    """Where "small" ends and "similar" begins (rules of thumb calibrated on real data, not laws)."""

    #: Fewer train images per class (median over classes) than this is a small dataset.
    small_per_class: int = 100
    #: Below this probe skill the pooled features hardly separate the classes: different data.
    min_probe_skill: float = 0.3
    #: Similar data needs an ImageNet head at least this confident on average (it recognises the images)...
    similar_confidence: float = 0.3
    #: ...and pooled features that beat the middle tap's by at least this much probe accuracy.
    similar_top_gain: float = 0.1


@dataclass
class Advice:
    """A recommended strategy, the numbers it rests on, and why."""

    strategy: str
    kwargs: dict[str, Any]
    regime: str  # "small-similar", "small-different", "large-similar" or "large-different"
    explanation: str
    measures: dict[str, float | int]
    thresholds: Thresholds = field(default_factory=Thresholds)

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "kwargs": self.kwargs, "regime": self.regime,
                "explanation": self.explanation, "measures": self.measures, "thresholds": asdict(self.thresholds)}

    def command(self, module: str, dataset: str) -> str:
        """The ``hub finetune`` command line that trains what this advice recommends."""
        name = next(short for short, cls in STRATEGIES.items() if cls.__name__ == self.strategy)
        options = [f"{_CLI_OPTIONS[key]} {shlex.quote(str(value))}" for key, value in self.kwargs.items()]
        return " ".join(["hub finetune", shlex.quote(module), "--dataset", shlex.quote(dataset), "--strategy", name, *options])


#: ``Advice.kwargs`` keys -> the ``hub finetune`` options that set them.
_CLI_OPTIONS = {"head": "--head", "until": "--freeze-until", "k": "--freeze-k"}


def advise(dataset: BaseDataset, module, *, max_per_class: int = 20, thresholds: Thresholds | None = None,
           seed: int = 0, batch_size: int = 32) -> Advice:
    """Recommend a fine-tuning strategy for ``dataset`` on ``module`` (a :class:`hubkit.Module`)."""
    thresholds = thresholds or Thresholds()
    if max_per_class < 2:
        raise ConfigError(f"max_per_class must be at least 2 (the probe is cross-validated), not {max_per_class}")
    started = time.perf_counter()
    train = dataset.samples("train")
    if dataset.num_classes < 2 or not train:
        raise DatasetError("advice needs a train split with at least 2 classes",
                           hint="run `hub validate-data` on the dataset first")
    per_class = np.bincount([s.label for s in train], minlength=dataset.num_classes)
    sample = _bounded_sample(train, dataset.num_classes, max_per_class, seed)
    pooled, tap, confidence, unreadable, _ = _features(module, sample, batch_size)
    labels = np.array([s.label for s, ok in zip(sample, unreadable) if not ok])
    chance = float(np.bincount(labels).max() / len(labels)) if len(labels) else 1.0
    probe = _probe_accuracy(pooled, labels, seed)
    tap_probe = _probe_accuracy(tap[1], labels, seed) if tap else float("nan")
    skill = (probe - chance) / (1.0 - chance) if chance < 1.0 else 0.0
    measures = {
        "num_classes": dataset.num_classes, "train_images": len(train),
        "images_per_class": float(np.median(per_class)), "min_images_per_class": int(per_class.min()),
        "sampled_images": int(len(labels)), "unreadable_sampled": int(sum(unreadable)),
        "probe_accuracy": round(probe, 4), "chance_accuracy": round(chance, 4), "probe_skill": round(skill, 4),
        "imagenet_confidence": round(confidence, 4),
    }
    if tap:
        measures.update(middle_tap=tap[0], middle_probe_accuracy=round(tap_probe, 4),
                        top_gain=round(probe - tap_probe, 4))
    measures["seconds"] = round(time.perf_counter() - started, 2)
    return recommend(measures, [t.name for t in module.manifest.features.taps], thresholds)


@dataclass(frozen=True)
class BackboneScore:
    """How well one backbone's frozen features fit a dataset, and what it costs (``rank_backbones``)."""

    module: str
    #: Cross-validated accuracy of a logistic-regression probe on the pooled features of the sample.
    probe_accuracy: float
    probe_C: float
    params: int
    #: Images per second through the model here (the forward passes of the measurement, batch ``batch_size``).
    images_per_second: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def rank_backbones(dataset: BaseDataset, modules: list, *, max_per_class: int = 20, seed: int = 0,
                   batch_size: int = 32) -> list[BackboneScore]:
    """Rank candidate backbones (:class:`hubkit.Module` objects) for ``dataset``, best first.

    Each one's pooled features of the same bounded train sample (``max_per_class`` images per class)
    are scored by a logistic-regression probe whose C is chosen by stratified cross-validation (the
    ``logistic`` head itself): the standard measure of how transferable frozen features are. Ties
    within half a point go to the faster backbone. A class with too few sampled images for the
    cross-validation is a DatasetError naming it."""
    if len(modules) < 1:
        raise ConfigError("no backbone to rank", hint="give one or more module names")
    train = dataset.samples("train")
    if dataset.num_classes < 2 or not train:
        raise DatasetError("ranking backbones needs a train split with at least 2 classes",
                           hint="run `hub validate-data` on the dataset first")
    sample = _bounded_sample(train, dataset.num_classes, max_per_class, seed)
    scores = []
    for module in modules:
        started = time.perf_counter()
        pooled, _, _, unreadable, forward_seconds = _features(module, sample, batch_size)
        labels = np.array([s.label for s, bad in zip(sample, unreadable) if not bad])
        probe = LogisticHead()
        probe.fit(pooled, labels, dataset.num_classes, seed=seed, class_names=dataset.label_list)
        scores.append(BackboneScore(module.manifest.ref, round(float(probe.cv_score), 4), float(probe.best_C),
                                    sum(p.numel() for p in module.model.parameters()),
                                    round(len(labels) / max(forward_seconds, 1e-9), 1),
                                    round(time.perf_counter() - started, 2)))
    return sorted(scores, key=lambda s: (-round(s.probe_accuracy * 200), -s.images_per_second))


def recommend(measures: dict, taps: list[str], thresholds: Thresholds) -> Advice:
    """The strategy for ``measures`` (as ``advise`` takes them) on a module with feature ``taps`` (names, in order)."""
    if math.isnan(measures["probe_accuracy"]):
        raise DatasetError("too few readable train images to measure anything (at least 2 classes need 2 images each)",
                           hint="run `hub validate-data` on the dataset")
    small = measures["images_per_class"] < thresholds.small_per_class
    similar = (measures["probe_skill"] >= thresholds.min_probe_skill
               and measures["imagenet_confidence"] >= thresholds.similar_confidence
               and ("top_gain" not in measures or measures["top_gain"] >= thresholds.similar_top_gain))
    middle = taps[len(taps) // 2] if taps else None
    below_top = taps[-2] if len(taps) >= 2 else None
    if small and similar:
        strategy, kwargs, regime = FEATURE_EXTRACTION, {"head": "gap_linear"}, "small-similar"
        why = ("keep the backbone frozen and train only a linear head on the pooled features: the features already "
               "separate the classes, and with this little data fine-tuning would mostly overfit")
    elif small:
        strategy, kwargs, regime = FREEZE_FIRST_K, ({"until": middle} if middle else {"k": 1}), "small-different"
        why = (f"freeze the first blocks, up to the middle tap {middle!r} (generic edges and textures transfer to "
               f"any images), and fine-tune the blocks above it with the head: the top layers are too specific to "
               f"ImageNet, and there is too little data to retrain the whole network")
    elif similar:
        strategy, kwargs, regime = FREEZE_FIRST_K, ({"until": below_top} if below_top else {"k": 1}), "large-similar"
        why = (f"freeze everything up to tap {below_top!r} and fine-tune the top blocks with the head: the "
               f"features already fit, and there is enough data to adapt the most specific layers without overfitting")
    else:
        strategy, kwargs, regime = FULL_FINETUNE, {}, "large-different"
        why = ("fine-tune the whole network, starting from the pretrained weights: the images differ from "
               "ImageNet and there is enough data to adapt every layer")
    explanation = f"{_findings(measures, thresholds, small, similar)}. Recommendation: {why}."
    return Advice(strategy, kwargs, regime, explanation, measures, thresholds)


def _findings(measures: dict, thresholds: Thresholds, small: bool, similar: bool) -> str:
    """What the measures say about the dataset's size and likeness to the pretraining data, in words."""
    size = (f"{measures['images_per_class']:g} images per class (median) is {'below' if small else 'at least'} "
            f"the {thresholds.small_per_class} that separate small from large datasets")
    likeness = (f"a nearest-centroid probe on the pooled features reaches {measures['probe_accuracy']:.0%} against a "
                f"chance of {measures['chance_accuracy']:.0%} (skill {measures['probe_skill']:.2f}, needs "
                f"{thresholds.min_probe_skill})")
    if "middle_tap" in measures:
        likeness += (f", {measures['top_gain']:+.0%} over the same probe on the middle tap {measures['middle_tap']!r} "
                     f"(similar from {thresholds.similar_top_gain:+.0%})")
    likeness += (f"; the ImageNet head's mean confidence is {measures['imagenet_confidence']:.2f} (similar from "
                 f"{thresholds.similar_confidence}): the images look {'similar to' if similar else 'different from'} "
                 f"the pretraining data")
    return f"{size}; {likeness}"


def _bounded_sample(train: list[Sample], num_classes: int, max_per_class: int, seed: int) -> list[Sample]:
    """At most ``max_per_class`` samples of each class, drawn at random (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    picked: list[Sample] = []
    for label in range(num_classes):
        members = [s for s in train if s.label == label]
        if len(members) > max_per_class:
            members = [members[i] for i in sorted(rng.choice(len(members), max_per_class, replace=False))]
        picked += members
    return picked


def _features(module, samples: list[Sample], batch_size: int):
    """Pooled features, a middle tap's average-pooled features, the ImageNet head's mean max-softmax,
    which samples could not be read, and the seconds spent in the model: from one forward pass per batch."""
    model = module.model
    taps = module.manifest.features.taps
    tap = taps[len(taps) // 2] if taps else None
    dataset = ImageSamples(samples, module.transform)

    def prepare(index: int):
        try:
            return dataset[index][0]
        except HubkitError:
            return None

    pooled, tapped, confidences, unreadable, forward_seconds = [], [], [], [], 0.0
    outputs = {"tap": tap.module} if tap is not None else {}
    with capture(model, outputs, inputs={"pooled": model.get_classifier()}) as captured, \
            ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        for start in range(0, len(samples), batch_size):
            chunk = list(pool.map(prepare, range(start, min(start + batch_size, len(samples)))))
            unreadable += [x is None for x in chunk]
            batch = [x for x in chunk if x is not None]
            if not batch:
                continue
            started = time.perf_counter()
            with torch.inference_mode():  # the torch model itself: the taps are hooks on it, whatever runtime predicts
                probs = model(torch.stack(batch).to(module.device)).float().softmax(dim=1).cpu()
            forward_seconds += time.perf_counter() - started
            confidences.append(probs.max(dim=1).values)
            pooled.append(captured["pooled"].float().flatten(1).cpu())
            if tap is not None:
                tapped.append(global_average_pool(captured["tap"].float()).cpu())
    if not pooled:
        raise DatasetError("none of the sampled train images could be read", hint="run `hub validate-data` first")
    tap_features = (tap.name, torch.cat(tapped).numpy()) if tap is not None else None
    return (torch.cat(pooled).numpy(), tap_features, float(torch.cat(confidences).mean()), unreadable,
            forward_seconds)


def _probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """Cross-validated accuracy (up to 5 stratified folds) of a nearest-centroid probe on
    standardised, L2-normalised features: cheap, and meaningful without any tuning."""
    counts = np.bincount(labels)
    kept = counts[labels] >= 2  # a class seen once cannot be both fitted and held out
    features, labels = features[kept], labels[kept]
    if len(np.unique(labels)) < 2:
        return float("nan")
    folds = min(5, int(np.bincount(labels)[np.unique(labels)].min()))
    fold_of = np.empty(len(labels), dtype=int)  # stratified: each class dealt round-robin over the folds
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold_of[members] = np.arange(len(members)) % folds
    correct = 0
    for fold in range(folds):
        fit, held_out = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
        mean, std = features[fit].mean(axis=0), features[fit].std(axis=0) + 1e-6
        unit = (features - mean) / std
        unit /= np.linalg.norm(unit, axis=1, keepdims=True) + 1e-12
        classes = np.unique(labels[fit])
        centroids = np.stack([unit[fit][labels[fit] == c].mean(axis=0) for c in classes])
        predicted = classes[np.argmax(unit[held_out] @ centroids.T, axis=1)]
        correct += int((predicted == labels[held_out]).sum())
    return correct / len(labels)  # over the classes with two images or more
