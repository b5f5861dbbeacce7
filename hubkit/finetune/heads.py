"""Classifier heads put on a backbone's pooled feature vector.

A head is a small description (``spec()``, JSON) that builds an ``nn.Module`` for a given
feature width and class count; the same spec rebuilds the head from an exported manifest.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..errors import ConfigError


class Head:
    """Base class: ``build(in_features, num_classes)`` returns the layer(s) to train."""

    kind = "head"
    #: True when the head is fitted on extracted features rather than by gradient descent.
    fitted_on_features = False

    def build(self, in_features: int, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def spec(self) -> dict:
        return {"kind": self.kind}

    @property
    def is_plain_linear(self) -> bool:
        """A single linear layer: exportable as the timm model's own classifier."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


class FCHead(Head):
    """Fully connected layers on the pooled feature: dropout, hidden ReLU layers, dropout, linear."""

    kind = "fc"

    def __init__(self, hidden: Sequence[int] = (256,), dropout: float = 0.2):
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if not all(isinstance(h, int) and h > 0 for h in hidden):
            raise ConfigError(f"FCHead hidden sizes must be positive integers, got {hidden!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"FCHead dropout must be in [0, 1), got {dropout!r}")
        self.hidden, self.dropout = hidden, float(dropout)

    def build(self, in_features: int, num_classes: int) -> nn.Module:
        layers: list[nn.Module] = []
        width = in_features
        for h in self.hidden:
            layers += [nn.Dropout(self.dropout), nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers += [nn.Dropout(self.dropout), nn.Linear(width, num_classes)]
        return nn.Sequential(*layers)

    def spec(self) -> dict:
        return {"kind": self.kind, "hidden": list(self.hidden), "dropout": self.dropout}


class GAPLinearHead(Head):
    """Global average pooling (done by the backbone) followed by one linear layer."""

    kind = "gap_linear"

    def build(self, in_features: int, num_classes: int) -> nn.Module:
        return nn.Linear(in_features, num_classes)

    @property
    def is_plain_linear(self) -> bool:
        return True


class SVMHead(Head):
    """A linear SVM (scikit-learn ``LinearSVC``) on extracted features, C chosen by k-fold CV.

    It is fitted once on the cached features of train+validate and becomes a linear layer,
    so it predicts, evaluates and exports like the other heads.
    """

    kind = "svm"
    fitted_on_features = True

    def __init__(self, Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), folds: int = 3):
        if not Cs or any(c <= 0 for c in Cs):
            raise ConfigError(f"SVMHead Cs must be positive numbers, got {Cs!r}")
        if folds < 2:
            raise ConfigError(f"SVMHead folds must be at least 2, got {folds!r}")
        self.Cs, self.folds = tuple(float(c) for c in Cs), int(folds)
        self.best_C: float | None = None
        self.cv_score: float | None = None

    def build(self, in_features: int, num_classes: int) -> nn.Module:
        return nn.Linear(in_features, num_classes)

    @property
    def is_plain_linear(self) -> bool:
        return True

    def spec(self) -> dict:
        return {"kind": self.kind, "Cs": list(self.Cs), "folds": self.folds}

    def fit(self, features, labels, num_classes: int, seed: int = 0):
        """Grid-search C with stratified k-fold CV; returns (weight, bias) numpy arrays for a linear layer."""
        import numpy as np
        from sklearn.model_selection import GridSearchCV, StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC

        folds = min(self.folds, int(np.bincount(labels, minlength=num_classes).min()))
        if folds < 2:
            raise ConfigError("the SVM head needs at least 2 images of every class in train+validate for cross-validation")
        pipe = make_pipeline(StandardScaler(), LinearSVC(dual="auto", max_iter=5000, random_state=seed))
        search = GridSearchCV(pipe, {"linearsvc__C": list(self.Cs)},
                              cv=StratifiedKFold(folds, shuffle=True, random_state=seed), n_jobs=1)
        search.fit(features, labels)
        self.best_C, self.cv_score = float(search.best_params_["linearsvc__C"]), float(search.best_score_)
        scaler, svm = search.best_estimator_[0], search.best_estimator_[1]
        coef, intercept = svm.coef_, svm.intercept_
        if coef.shape[0] == 1:  # binary: one decision function, class 1 when positive
            coef, intercept = np.concatenate([-coef, coef]), np.concatenate([-intercept, intercept])
        # fold the standardisation into the linear layer: w·(x-m)/s + b
        weight = coef / scaler.scale_
        bias = intercept - weight @ scaler.mean_
        return weight.astype(np.float32), bias.astype(np.float32)


HEADS = {"fc": FCHead, "gap_linear": GAPLinearHead, "svm": SVMHead}


def make_head(head: "Head | str | dict") -> Head:
    """A head from an instance, a name (``fc``, ``gap_linear``, ``svm``) or a spec dict."""
    if isinstance(head, Head):
        return head
    if isinstance(head, str):
        head = {"kind": head}
    if isinstance(head, dict):
        spec = dict(head)
        kind = spec.pop("kind", None)
        if kind not in HEADS:
            raise ConfigError(f"unknown head {kind!r}", hint=f"use one of {', '.join(HEADS)}")
        try:
            return HEADS[kind](**spec)
        except TypeError as exc:
            raise ConfigError(f"bad options for head {kind!r}: {exc}") from None
    raise ConfigError(f"a head must be a Head, a name or a spec dict, not {type(head).__name__}")
