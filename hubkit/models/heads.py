"""Classifier heads put on a backbone's pooled feature vector.

A head is a small description (``spec()``, JSON) that builds an ``nn.Module`` for a given
feature width and class count; the same spec rebuilds the head from an exported manifest.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch
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


#: The regularisation grid of the linear probes: C = 1e-5, 3e-5, 1e-4 ... 3, 10. On
#: standardised 1280-d backbone features the best C is typically 1e-4 to 1e-3 (strong), so the
#: grid reaches well below that and well above.
LINEAR_CS = tuple(float(f"{m}e{e}") for e in range(-5, 1) for m in (1, 3)) + (10.0,)
#: Stop walking the C grid once this many values in a row did not beat the best so far (one
#: decade on the default grid: past the best, CV accuracy only falls slowly as C grows).
PATH_PATIENCE = 2
#: L-BFGS iterations per C value at most (preconditioned and warm-started, a fit takes tens).
LBFGS_MAX_ITER = 200
#: L-BFGS stops when no gradient entry of the (per-image) objective exceeds this (scikit-learn's
#: ``LogisticRegression`` stops at the same 1e-4).
LBFGS_TOLERANCE = 1e-4


class LinearProbe(Head):
    """A linear model fitted once on standardised extracted features, its regularisation ``C``
    chosen by stratified k-fold cross-validation (the standard probe of transfer learning).

    The objective is scikit-learn's, ``C * sum(loss) + ||W||^2 / 2`` (intercept free), for every
    C of the grid from the strongest regulariser to the weakest, each solution warm-started from
    the previous one; the walk stops once ``PATH_PATIENCE`` values in a row did not beat the best.
    The k fold models are solved together, and the model on all the data at the chosen C starts
    from their mean (:class:`_ProbePath`). The fitted model, with the
    standardisation folded in, becomes one linear layer, so it predicts, evaluates and exports
    like the other heads.
    After ``fit``: ``best_C``, ``cv_score`` (mean CV accuracy at ``best_C``), ``cv_folds`` and
    ``cv_scores`` ({C: mean CV accuracy} for the grid values tried).
    """

    fitted_on_features = True
    #: An upper estimate of the loss's second derivative in a logit (for the preconditioner).
    curvature = 1.0

    def __init__(self, Cs: Sequence[float] = LINEAR_CS, folds: int = 5):
        if not Cs or any(not c > 0 for c in Cs):
            raise ConfigError(f"{type(self).__name__} Cs must be positive numbers, got {Cs!r}")
        if folds < 2:
            raise ConfigError(f"{type(self).__name__} folds must be at least 2, got {folds!r}")
        self.Cs, self.folds = tuple(sorted(float(c) for c in Cs)), int(folds)
        self.best_C: float | None = None
        self.cv_score: float | None = None
        self.cv_folds: int | None = None
        self.cv_scores: dict[float, float] = {}

    def build(self, in_features: int, num_classes: int) -> nn.Module:
        return nn.Linear(in_features, num_classes)

    def spec(self) -> dict:
        return {"kind": self.kind, "Cs": list(self.Cs), "folds": self.folds}

    def summary(self) -> dict:
        """What the fit chose and how well it cross-validated (for reports)."""
        return {"head": self.kind, "C": self.best_C, "cv_acc": self.cv_score, "cv_folds": self.cv_folds,
                "cv_scores": {f"{c:g}": s for c, s in self.cv_scores.items()}}

    def loss(self, logits: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of each row of ``logits`` (summed over the last axis) and its gradient in the
        logits, given the one-hot labels (subclasses; written out, since autograd would cost a
        third of the fit)."""
        raise NotImplementedError

    def fit(self, features, labels, num_classes: int, seed: int = 0, class_names: Sequence[str] | None = None):
        """Choose C by stratified k-fold CV, refit on everything; returns (weight, bias) float32
        numpy arrays for an ``nn.Linear`` that takes the raw (unstandardised) features."""
        with _one_thread():
            return self._fit(features, labels, num_classes, seed, class_names)

    def _fit(self, features, labels, num_classes: int, seed: int, class_names: Sequence[str] | None):
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        held_out = self._folds(y.numpy(), num_classes, seed, class_names)
        path = _ProbePath(x, y, num_classes, held_out, self.loss, self.curvature)
        self.cv_scores = {}
        for C in self.Cs:
            self.cv_scores[C] = path.solve_folds(C)
            scores = list(self.cv_scores.values())
            if len(scores) - 1 - int(np.argmax(scores)) >= PATH_PATIENCE:
                break  # no gain for a while: weaker regularisers only overfit more (and take longest to fit)
        # ties go to the strongest regulariser (the first on the grid)
        self.best_C = max(self.cv_scores, key=lambda c: (self.cv_scores[c], -c))
        self.cv_score, self.cv_folds = self.cv_scores[self.best_C], int(held_out.shape[1])
        weight, bias = path.refit(self.best_C)
        return weight.numpy().astype(np.float32), bias.numpy().astype(np.float32)

    def _folds(self, labels: np.ndarray, num_classes: int, seed: int, class_names: Sequence[str] | None) -> torch.Tensor:
        """Stratified folds, as many as the rarest class allows (up to ``folds``): an (images, folds)
        bool tensor, True where an image is held out of a fold's training."""
        counts = np.bincount(labels, minlength=num_classes)
        rare = [i for i in range(num_classes) if counts[i] < 2]
        if rare:
            names = class_names or [str(i) for i in range(num_classes)]
            which = ", ".join(f"{names[i]!r} ({counts[i]} image{'s' if counts[i] != 1 else ''})" for i in rare[:5])
            raise ConfigError(f"the {self.kind} head chooses its regularisation by cross-validation, which needs at "
                              f"least 2 images of every class in train+validate; too few in class {which}",
                              hint=f"add images of that class (>= {self.folds} for {self.folds}-fold CV), drop the "
                                   f"class, or use the fc head")
        k = int(min(self.folds, counts.min()))
        rng = np.random.default_rng(seed)
        fold_of = np.empty(len(labels), dtype=np.int64)
        for c in range(num_classes):
            members = np.flatnonzero(labels == c)
            fold_of[rng.permutation(members)] = np.arange(len(members)) % k
        return torch.as_tensor(fold_of[:, None] == np.arange(k)[None, :])


class _ProbePath:
    """The probe problems of one data set: its k fold models, solved together for each C of the
    path, then the model on all the data at the chosen C.

    Together, because one matrix product with the fold models' weights side by side runs at twice
    the speed of k thin ones, and the fits take about as many iterations each. The features are
    standardised once (mean and deviation of all the images, labels unused) and expressed in their
    principal axes ``V`` (eigenvalues ``e``): there the data term's curvature is about
    ``curvature * e_j`` along axis j and the regulariser's ``1 / (C n)``, so with the weights
    written ``W = p * U``, ``p_j = (curvature * e_j + 1 / (C n)) ** -0.5``, the objective in ``U``
    has about unit curvature in every direction and L-BFGS converges in tens of iterations for any
    C (unscaled, weak regularisers took it hundreds). The minimum is the same: only its
    coordinates changed. The products run in float32.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, held_out: torch.Tensor, loss,
                 curvature: float):
        self.mean = x.mean(0)
        scale = x.std(0, unbiased=False)
        self.scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        standardised = (x - self.mean) / self.scale
        # float64: float32's eigh fails on the many equal (zero) eigenvalues of fewer images than features
        variances, axes = torch.linalg.eigh(standardised.T @ standardised / len(x))
        self.axes = axes.float()
        self.z = (standardised.float() @ self.axes).contiguous()
        self.variances = variances.clamp(min=0).float()
        self.y, self.onehot, self.held_out = y, nn.functional.one_hot(y, num_classes).float(), held_out
        self.loss, self.curvature, self.num_classes = loss, curvature, num_classes
        folds = held_out.shape[1]
        #: The fold models at each C solved: (weight (features, folds, classes), bias (folds, classes)).
        self.fold_models = {}
        self._last = (torch.zeros(self.z.shape[1], folds, num_classes), torch.zeros(folds, num_classes))

    def solve_folds(self, C: float) -> float:
        """Fit the fold models at C from the previous C's; returns their mean held-out accuracy."""
        weight, bias = self._minimise(~self.held_out, C, *self._last)
        self.fold_models[C] = self._last = weight, bias
        predicted = self._logits(weight, bias).argmax(2)
        correct = (predicted == self.y[:, None]) & self.held_out
        return float((correct.sum(0) / self.held_out.sum(0)).mean())

    def refit(self, C: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The model on all the data at C, started from the mean of the fold models there (close to
        it: each saw most of the data); returns (weight, bias) in float64 of the linear layer on
        raw features, ``W·V^T·(x - m)/s + b``."""
        weight, bias = self.fold_models[C]
        weight, bias = self._minimise(torch.ones(len(self.y), 1, dtype=torch.bool), C,
                                      weight.mean(1, keepdim=True), bias.mean(0, keepdim=True))
        raw = (self.axes.double() @ weight[:, 0].double() / self.scale[:, None]).T
        return raw, bias[0].double() - raw @ self.mean

    def _minimise(self, trains: torch.Tensor, C: float, weight: torch.Tensor, bias: torch.Tensor):
        """Minimise each problem's ``mean(loss) + ||W||^2 / (2 C n)`` (scikit-learn's objective
        divided by C n) over its training rows (``trains``: images x problems, bool) by L-BFGS."""
        counts = trains.sum(0).float()
        row_weights = trains.float() / counts  # each problem's mean over its own rows
        ridge = 1 / (C * counts)[:, None]
        precondition = (self.curvature * self.variances[:, None] + ridge.T).rsqrt()[:, :, None]
        u = (weight / precondition).requires_grad_(True)
        bias = bias.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([u, bias], lr=1.0, max_iter=LBFGS_MAX_ITER, history_size=20,
                                      tolerance_grad=LBFGS_TOLERANCE, tolerance_change=1e-9, line_search_fn="strong_wolfe")

        def closure():  # the gradients written out: autograd cost a third of the fit
            w = precondition * u.detach()
            losses, dlogits = self.loss(self._logits(w, bias.detach()), self.onehot[:, None, :])
            dlogits *= row_weights[:, :, None]
            grad_w = (dlogits.flatten(1).T @ self.z).T.reshape(w.shape) + ridge * w
            u.grad, bias.grad = (precondition * grad_w).contiguous(), dlogits.sum(0)
            return (losses * row_weights).sum() + (ridge * w.pow(2)).sum() / 2

        optimizer.step(closure)
        return (precondition * u).detach(), bias.detach()

    def _logits(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(images, problems, classes): every problem's logits for every image."""
        return (self.z @ weight.flatten(1)).view(len(self.z), *bias.shape) + bias


@contextlib.contextmanager
def _one_thread():
    """Run torch on one thread: L-BFGS does many small tensor ops per iteration, and with a
    thread team each op waits for every thread, which on a busy machine costs a scheduler slice
    per op (a fit measured 8x faster on one thread than on two on a loaded 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class SVMHead(LinearProbe):
    """A linear SVM: one-vs-rest squared hinge loss (scikit-learn ``LinearSVC``'s default), C by CV."""

    kind = "svm"
    curvature = 2.0

    def loss(self, logits: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        signs = 2 * onehot - 1
        margins = (1 - signs * logits).clamp(min=0)
        return margins.pow(2).sum(-1), -2 * signs * margins


class LogisticHead(LinearProbe):
    """Multinomial logistic regression (the linear probe of the transfer-learning literature), C by CV."""

    kind = "logistic"
    curvature = 0.25

    def loss(self, logits: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # by hand rather than log_softmax, which is twice as slow on 10-wide rows
        top = logits.amax(-1, keepdim=True)
        exp = (logits - top).exp_()
        total = exp.sum(-1, keepdim=True)
        return (total.log() + top).squeeze(-1) - (logits * onehot).sum(-1), exp.div_(total).sub_(onehot)


def plain_linear(head: nn.Module) -> nn.Linear | None:
    """The head's only linear layer when the built head is (dropout +) one linear layer, else None:
    such a head is exported as the timm model's own classifier."""
    if isinstance(head, nn.Linear):
        return head
    if isinstance(head, nn.Sequential):
        layers = [m for m in head if not isinstance(m, nn.Dropout)]
        if len(layers) == 1 and isinstance(layers[0], nn.Linear):
            return layers[0]
    return None


HEADS = {"fc": FCHead, "gap_linear": GAPLinearHead, "svm": SVMHead, "logistic": LogisticHead}


def make_head(head: "Head | str | dict") -> Head:
    """A head from an instance, a name (``fc``, ``gap_linear``, ``svm``, ``logistic``) or a spec dict."""
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
