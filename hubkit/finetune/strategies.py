"""Transfer-learning strategies: what trains, at which learning rate, on which schedule.

Each strategy is a small class. The common options compose with all of them: the ``head``,
``cut_at`` (use the backbone only up to a named layer or feature tap), ``weights`` (load custom
weights by parameter name into the module's architecture), ``l2_sp`` (a penalty pulling the
backbone towards its pretrained weights) and ``schedule`` (constant, cosine, onecycle,
slanted_triangular). Weight decay and gradient clipping live in :class:`RunConfig`.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable

import torch
from timm.models import group_parameters
from torch import nn

from ..errors import ConfigError, HubkitWarning, UnknownTapError, WeightsError
from ..hub.fs import sha256_file
from ..models.classifier import ClassifierModel
from ..models.heads import GAPLinearHead, Head, LinearProbe, LogisticHead, make_head
from ..models.weights import load_state_dict

SCHEDULES = ("constant", "cosine", "onecycle", "slanted_triangular")
#: How a ClassifierModel names its backbone's parameters.
NESTED_PREFIX = "backbone."


def schedule_factor(kind: str, total_steps: int, *, cut_frac: float = 0.1, ratio: float = 32.0) -> Callable[[int], float]:
    """The learning-rate multiplier at each step for a named schedule."""
    total = max(1, total_steps)
    if kind == "constant":
        return lambda step: 1.0
    if kind == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if kind == "onecycle":
        warm = max(1, int(0.3 * total))

        def one_cycle(step: int) -> float:
            if step < warm:
                return 1 / 25 + (1 - 1 / 25) * step / warm
            t = min(1.0, (step - warm) / max(1, total - warm))
            return 1e-4 + (1 - 1e-4) * 0.5 * (1.0 + math.cos(math.pi * t))
        return one_cycle
    if kind == "slanted_triangular":
        cut = max(1, int(total * cut_frac))

        def slanted(step: int) -> float:
            p = step / cut if step < cut else max(0.0, 1 - (step - cut) / max(1, total - cut))
            return (1 + p * (ratio - 1)) / ratio
        return slanted
    raise ConfigError(f"unknown schedule {kind!r}", hint=f"use one of {', '.join(SCHEDULES)}")


def load_weights_by_name(backbone: nn.Module, path: str | Path) -> list[str]:
    """Copy the tensors of a weights file whose names and shapes match into ``backbone``; returns the names loaded."""
    source = load_state_dict(path)
    target = backbone.state_dict()
    loaded, wrong = [], []
    for key, value in source.items():
        if key in target:
            if tuple(value.shape) != tuple(target[key].shape):
                wrong.append(f"{key} {tuple(value.shape)} vs {tuple(target[key].shape)}")
            else:
                loaded.append(key)
    if wrong:
        raise WeightsError(f"{path}: {len(wrong)} tensors have the wrong shape for this architecture (e.g. {wrong[0]})")
    if not loaded:
        raise WeightsError(f"{path}: no tensor name matches the architecture (e.g. it has {list(source)[:2]}, "
                           f"the model {list(target)[:2]})", hint="rename the keys to the timm model's names")
    backbone.load_state_dict({k: source[k] for k in loaded}, strict=False)
    missing = [k for k in target if k not in source]
    if missing:  # the rest keeps the module's pretrained weights: legitimate, but never silent
        warnings.warn(f"{path}: loaded {len(loaded)} of {len(target)} tensors ({len(missing)} missing: "
                      f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; they keep the module's weights)",
                      HubkitWarning, stacklevel=2)
    return loaded


def layer_groups(backbone: nn.Module) -> list[tuple[str, list[str]]]:
    """The backbone's parameter names in timm's coarse layer groups, in forward order: the stem,
    then each block or stage (timm's ``group_matcher``; layers after the last block join it),
    each named by the modules its parameters share (``stem``, ``blocks.3``, ``blocks.6+conv_head+bn2``).

    A fine-tuned module exported as a ``ClassifierModel`` wraps its timm backbone: its groups
    are the backbone's, with the ``backbone.`` prefix on the parameter names."""
    root, prefix = backbone, ""
    while isinstance(root, ClassifierModel):
        root, prefix = root.backbone, prefix + NESTED_PREFIX
    if not callable(getattr(root, "group_matcher", None)):
        raise ConfigError(f"{type(root).__name__} has no group_matcher, so its layer groups are unknown",
                          hint="use FeatureExtractionStrategy or FullFineTune for this architecture")
    grouped = group_parameters(root, root.group_matcher(coarse=True))
    return [("stem" if i == 0 else _group_name(grouped[key]), [prefix + n for n in grouped[key]])
            for i, key in enumerate(sorted(grouped))]


def _group_name(names: list[str]) -> str:
    """The module path each top-level module's parameters share (at most two levels: ``blocks.3``,
    ``layer2``), joined with ``+`` when the group spans several top-level modules."""
    by_top: dict[str, list[list[str]]] = {}
    for name in names:
        parts = name.split(".")[:-1] or [name]
        by_top.setdefault(parts[0], []).append(parts)
    return "+".join(".".join(_shared_prefix(paths)[:2]) for paths in by_top.values())


def _shared_prefix(paths: list[list[str]]) -> list[str]:
    shared = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        shared.append(parts[0])
    return shared


def _holds(name: str, module: str) -> bool:
    """Whether parameter ``name`` belongs to ``module`` (a path, given with or without the
    ``backbone.`` prefixes of a nested model)."""
    while not name.startswith(module + "."):
        if not name.startswith(NESTED_PREFIX):
            return False
        name = name[len(NESTED_PREFIX):]
    return True


def freeze_batchnorm_of_frozen(model: nn.Module) -> None:
    """Put normalisation layers whose parameters are all frozen in eval mode (running stats stay put)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


class Strategy:
    """Base class. Subclasses decide ``setup`` (what is frozen) and ``param_groups`` (learning rates)."""

    name = "strategy"
    #: Start from the module's pretrained weights (False: same architecture, random init).
    pretrained = True
    #: Train the head on backbone features computed once and cached.
    uses_feature_cache = False
    #: L2-SP needs a trainable backbone that starts from pretrained weights.
    allows_l2_sp = True

    def __init__(self, head: Head | str | dict = "fc", *, cut_at: str | None = None, weights: str | Path | None = None,
                 l2_sp: float = 0.0, schedule: str = "constant"):
        self.head = make_head(head)
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {schedule!r}", hint=f"use one of {', '.join(SCHEDULES)}")
        if l2_sp < 0:
            raise ConfigError(f"l2_sp must be >= 0, got {l2_sp!r}")
        if l2_sp and not self.allows_l2_sp:
            raise ConfigError(f"L2-SP needs a trainable, pretrained backbone; the {self.name} strategy has none")
        if weights is not None and not Path(weights).is_file():
            raise ConfigError(f"custom weights file {weights} does not exist")
        if self.head.fitted_on_features and not self.uses_feature_cache:
            raise ConfigError(f"the {self.head.kind} head is fitted on extracted features",
                              hint="use it with FeatureExtractionStrategy")
        self.cut_at, self.weights, self.l2_sp, self.schedule = cut_at, weights, float(l2_sp), schedule
        self._reference: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings()})"

    # --- identity (enters the checkpoint's configuration hash) ----------------------------------
    def settings(self) -> dict:
        """Everything about the strategy that decides the trained weights (part of the configuration hash)."""
        return {"name": self.name, "head": self.head.spec(), "cut_at": self.cut_at, "l2_sp": self.l2_sp,
                "schedule": self.schedule, "weights_sha256": sha256_file(self.weights) if self.weights else None,
                **self.options()}

    def options(self) -> dict:
        """Strategy-specific settings (for the configuration hash)."""
        return {}

    # --- the training-time hooks --------------------------------------------------------------
    def setup(self, model: ClassifierModel, features=None) -> None:
        """Freeze what this strategy freezes; remember the pretrained weights for L2-SP."""
        model.requires_grad_(True)
        if self.l2_sp:
            self._reference = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}

    def param_groups(self, model: ClassifierModel, lr: float) -> list[dict]:
        return [{"params": list(model.backbone.parameters()), "lr": lr, "name": "backbone"},
                {"params": list(model.head.parameters()), "lr": lr, "name": "head"}]

    def lr_lambda(self, total_steps: int) -> Callable[[int], float]:
        return schedule_factor(self.schedule, total_steps)

    def prepare(self, model: ClassifierModel, features_of: Callable[[str], "tuple[torch.Tensor, torch.Tensor] | None"],
                class_names: list[str], seed: int) -> None:
        """Called once before a fresh run's first step (not on resume), with ``features_of(split)``:
        the starting backbone's cached features and labels of a split (None when it is empty).
        LP-FT fits its head here."""

    def on_epoch_start(self, model: ClassifierModel, epoch: int) -> None:
        """Called before each epoch (gradual unfreezing happens here)."""

    def penalty(self, model: ClassifierModel) -> torch.Tensor | None:
        """L2-SP: ``l2_sp / 2 * ||w - w_pretrained||^2`` over the trainable backbone weights."""
        if not self.l2_sp:
            return None
        total = None
        for name, p in model.backbone.named_parameters():
            if p.requires_grad:
                ref = self._reference[name].to(p.device)
                term = (p - ref).pow(2).sum()
                total = term if total is None else total + term
        return None if total is None else 0.5 * self.l2_sp * total

    def state_dict(self) -> dict:
        """The strategy's phase (what is unfrozen), saved in checkpoints."""
        return {}

    def load_state_dict(self, model: ClassifierModel, state: dict) -> None:
        """Restore the phase saved by ``state_dict``."""


class FeatureExtractionStrategy(Strategy):
    """Frozen backbone; only the head trains, on backbone features computed once and cached."""

    name = "frozen"
    uses_feature_cache = True
    allows_l2_sp = False

    def setup(self, model: ClassifierModel, features=None) -> None:
        model.backbone.requires_grad_(False)
        model.head.requires_grad_(True)

    def param_groups(self, model: ClassifierModel, lr: float) -> list[dict]:
        return [{"params": list(model.head.parameters()), "lr": lr, "name": "head"}]


class FreezeFirstK(Strategy):
    """Freeze the stem and the first ``k`` blocks (or every block up to and including ``until``,
    a feature-tap name like ``stage2`` or a module path like ``blocks.2``); train the rest."""

    name = "freeze_k"

    def __init__(self, k: int | None = None, *, until: str | None = None, head: Head | str | dict = "fc", **kwargs):
        if (k is None) == (until is None):
            raise ConfigError("FreezeFirstK needs k (a number of blocks) or until (a layer name), exactly one")
        if k is not None and k < 0:
            raise ConfigError(f"FreezeFirstK k must be >= 0, got {k}")
        super().__init__(head, **kwargs)
        self.k, self.until = k, until
        self.frozen_groups: list[str] = []

    def options(self) -> dict:
        return {"k": self.k, "until": self.until}

    def _count(self, groups: list[tuple[str, list[str]]], features) -> int:
        """How many blocks (layer groups after the stem) to freeze."""
        if self.k is not None:
            return self.k
        target = self.until
        if features is not None:
            try:
                target = features.tap(self.until).module
            except UnknownTapError:
                pass
        holding = [i for i, (_, names) in enumerate(groups) if any(_holds(n, target) for n in names)]
        if not holding:
            raise ConfigError(f"FreezeFirstK: {self.until!r} is not a layer of this backbone",
                              hint=f"blocks: {', '.join(name for name, _ in groups[1:])}")
        return holding[-1]  # groups[0] is the stem: the group at index i is block i

    def setup(self, model: ClassifierModel, features=None) -> None:
        super().setup(model, features)
        groups = layer_groups(model.backbone)
        k = self._count(groups, features)
        if k > len(groups) - 1:
            raise ConfigError(f"FreezeFirstK: k={k} but the backbone has only {len(groups) - 1} blocks")
        frozen = groups[:k + 1]
        params = dict(model.backbone.named_parameters())
        for _, names in frozen:
            for n in names:
                params[n].requires_grad_(False)
        self.frozen_groups = [g for g, _ in frozen]

    def param_groups(self, model: ClassifierModel, lr: float) -> list[dict]:
        return [{"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": lr, "name": "backbone"},
                {"params": list(model.head.parameters()), "lr": lr, "name": "head"}]


class FullFineTune(Strategy):
    """Everything trains; the backbone at ``backbone_lr_mult`` times the head's learning rate."""

    name = "finetune"

    def __init__(self, head: Head | str | dict = "fc", *, backbone_lr_mult: float = 0.1, **kwargs):
        if not 0 < backbone_lr_mult <= 1:
            raise ConfigError(f"backbone_lr_mult must be in (0, 1], got {backbone_lr_mult}")
        super().__init__(head, **kwargs)
        self.backbone_lr_mult = float(backbone_lr_mult)

    def options(self) -> dict:
        return {"backbone_lr_mult": self.backbone_lr_mult}

    def param_groups(self, model: ClassifierModel, lr: float) -> list[dict]:
        return [{"params": list(model.backbone.parameters()), "lr": lr * self.backbone_lr_mult, "name": "backbone"},
                {"params": list(model.head.parameters()), "lr": lr, "name": "head"}]


class FromScratch(Strategy):
    """The same architecture, randomly initialised, all trained at one learning rate (a baseline)."""

    name = "scratch"
    pretrained = False
    allows_l2_sp = False



class ULMFiT(Strategy):
    """Discriminative learning rates (each block group ``decay`` times slower than the one above),
    gradual unfreezing (one more group from the top every ``unfreeze_every`` epochs, head first)
    and the slanted-triangular schedule (Howard & Ruder, 2018)."""

    name = "ulmfit"

    def __init__(self, head: Head | str | dict = "fc", *, decay: float = 2.6, unfreeze_every: int = 1,
                 schedule: str = "slanted_triangular", **kwargs):
        if decay < 1:
            raise ConfigError(f"ULMFiT decay must be >= 1, got {decay}")
        if unfreeze_every < 1:
            raise ConfigError(f"ULMFiT unfreeze_every must be >= 1 epoch, got {unfreeze_every}")
        super().__init__(head, schedule=schedule, **kwargs)
        self.decay, self.unfreeze_every = float(decay), int(unfreeze_every)
        self.unfrozen = 0  # backbone groups unfrozen, counted from the top
        self._groups: list[tuple[str, list[str]]] = []

    def options(self) -> dict:
        return {"decay": self.decay, "unfreeze_every": self.unfreeze_every}

    def setup(self, model: ClassifierModel, features=None) -> None:
        super().setup(model, features)
        self._groups = layer_groups(model.backbone)
        self._apply(model, 0)

    def _apply(self, model: ClassifierModel, unfrozen: int) -> None:
        self.unfrozen = min(unfrozen, len(self._groups))
        params = dict(model.backbone.named_parameters())
        cut = len(self._groups) - self.unfrozen
        for i, (_, names) in enumerate(self._groups):
            for n in names:
                params[n].requires_grad_(i >= cut)

    def param_groups(self, model: ClassifierModel, lr: float) -> list[dict]:
        params = dict(model.backbone.named_parameters())
        n = len(self._groups)
        groups = [{"params": [params[p] for p in names], "lr": lr / self.decay ** (n - i), "name": name}
                  for i, (name, names) in enumerate(self._groups)]
        return groups + [{"params": list(model.head.parameters()), "lr": lr, "name": "head"}]

    def on_epoch_start(self, model: ClassifierModel, epoch: int) -> None:
        self._apply(model, epoch // self.unfreeze_every)

    def state_dict(self) -> dict:
        return {"unfrozen": self.unfrozen, "groups": [g for g, _ in self._groups]}

    def load_state_dict(self, model: ClassifierModel, state: dict) -> None:
        self._apply(model, int(state.get("unfrozen", 0)))


class LPFT(Strategy):
    """Linear probe, then fine-tune (Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained
    Features"): the linear head is first fitted in closed form on the frozen features of the train
    split (a logistic probe, C chosen by cross-validation), then everything trains from that head
    at ``lr_mult`` times the configured learning rate. Starting from a good head, the first
    gradients do not tear up the pretrained features the way a random head's do.

    ``head`` is the probe (``logistic`` or ``svm``, or a :class:`LinearProbe`); the layer that
    trains is a plain linear one initialised from it. After the run, ``state_dict()["probe"]``
    holds the probe's choice, CV accuracy and, with a validation split, its validation accuracy."""

    name = "lpft"

    def __init__(self, head: Head | str | dict = "logistic", *, lr_mult: float = 0.1, schedule: str = "cosine", **kwargs):
        probe = make_head(head)
        if isinstance(probe, GAPLinearHead):
            probe = LogisticHead()
        if not isinstance(probe, LinearProbe):
            raise ConfigError(f"LP-FT starts from a linear probe, not a {probe.kind} head",
                              hint="use the logistic (default) or svm head")
        if not 0 < lr_mult <= 1:
            raise ConfigError(f"LP-FT lr_mult must be in (0, 1], got {lr_mult}")
        super().__init__(GAPLinearHead(), schedule=schedule, **kwargs)
        self.probe, self.lr_mult = probe, float(lr_mult)
        self.probe_result: dict | None = None

    def options(self) -> dict:
        return {"probe": self.probe.spec(), "lr_mult": self.lr_mult}

    def prepare(self, model: ClassifierModel, features_of, class_names: list[str], seed: int) -> None:
        x, y = features_of("train")
        weight, bias = self.probe.fit(x.numpy(), y.numpy(), len(class_names), seed=seed, class_names=class_names)
        with torch.no_grad():
            model.head.weight.copy_(torch.from_numpy(weight))
            model.head.bias.copy_(torch.from_numpy(bias))
        self.probe_result = {**self.probe.summary(), "fitted_on": ["train"], "images": int(len(y))}
        validate = features_of("validate")
        if validate is not None:
            with torch.no_grad():
                predicted = model.head(validate[0].to(model.head.weight.device)).argmax(1).cpu()
            self.probe_result["validate_acc"] = float((predicted == validate[1]).double().mean())

    def param_groups(self, model: ClassifierModel, lr: float) -> list[dict]:
        return [{"params": list(model.backbone.parameters()), "lr": lr * self.lr_mult, "name": "backbone"},
                {"params": list(model.head.parameters()), "lr": lr * self.lr_mult, "name": "head"}]

    def state_dict(self) -> dict:
        return {"probe": self.probe_result}

    def load_state_dict(self, model: ClassifierModel, state: dict) -> None:
        self.probe_result = state.get("probe")


STRATEGIES = {"frozen": FeatureExtractionStrategy, "freeze_k": FreezeFirstK, "finetune": FullFineTune,
              "scratch": FromScratch, "ulmfit": ULMFiT, "lpft": LPFT}


def make_strategy(name: str, head: Head | str | dict | None = None, *, freeze_k: int | None = None,
                  freeze_until: str | None = None, backbone_lr_mult: float | None = None, **options) -> Strategy:
    """A strategy by its short name (``hub finetune --strategy``), with the options that apply to it.

    ``head`` and the common ``options`` (``cut_at``, ``weights``, ``l2_sp``, ``schedule``): ``None``
    means the strategy's default (the fc head; LP-FT's logistic probe). ``freeze_k``/``freeze_until`` belong to ``freeze_k``
    (3 blocks when neither is given), ``backbone_lr_mult`` to ``finetune`` (default 0.1); given
    to another strategy they are an error rather than silently ignored.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}", hint=f"use one of {', '.join(STRATEGIES)}")
    misplaced = [option for option, value, owner in (("freeze_k", freeze_k, "freeze_k"),
                                                     ("freeze_until", freeze_until, "freeze_k"),
                                                     ("backbone_lr_mult", backbone_lr_mult, "finetune"))
                 if value is not None and name != owner]
    if misplaced:
        raise ConfigError(f"{', '.join(misplaced)} does not apply to the {name} strategy",
                          hint="drop it, or choose the strategy it belongs to (freeze_k or finetune)")
    common = {k: v for k, v in options.items() if v is not None}
    if head is not None:
        common["head"] = head
    if name == "freeze_k":
        return FreezeFirstK(3 if freeze_k is None and freeze_until is None else freeze_k, until=freeze_until, **common)
    if name == "finetune" and backbone_lr_mult is not None:
        common["backbone_lr_mult"] = backbone_lr_mult
    return STRATEGIES[name](**common)


def strategy_from_settings(settings: dict, *, weights: str | Path | None = None) -> Strategy:
    """The strategy a checkpoint's recorded ``Strategy.settings()`` describe (to evaluate or predict with a
    finished run). ``weights``: the custom backbone weights the run started from, when it had any.

    Raises ConfigError when the settings name no strategy or do not fit it, or the weights file is
    not the one the run used."""
    options = {k[len("strategy."):]: v for k, v in settings.items() if k.startswith("strategy.")} or dict(settings)
    name = options.pop("name", None)
    if name not in STRATEGIES:
        raise ConfigError(f"the run's strategy {name!r} is unknown to this hubkit", hint=f"known: {', '.join(STRATEGIES)}")
    recorded_weights = options.pop("weights_sha256", None)
    if recorded_weights and (weights is None or not Path(weights).is_file() or sha256_file(weights) != recorded_weights):
        raise ConfigError(f"the run started from custom backbone weights (sha256 {recorded_weights[:12]}…) that are "
                          f"not at {weights or 'the recorded path'}", hint="put that weights file back where it was")
    if name == "lpft":
        options["head"] = options.pop("probe")  # its head is built from the probe
    try:
        return STRATEGIES[name](**options, weights=weights if recorded_weights else None)
    except TypeError as exc:
        raise ConfigError(f"the run's {name} settings do not fit this hubkit's strategy: {exc}",
                          hint="evaluate it with the hubkit version that trained it") from None
