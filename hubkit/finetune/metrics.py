"""Classification metrics for evaluation: accuracy, macro precision/recall/F1, confusion matrix."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ConfigError

METRICS = ("acc", "precision", "recall", "f1")


def check_metric_names(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [n for n in names if n not in METRICS]
    if not names or unknown:
        raise ConfigError(f"unknown metrics {unknown or names!r}", hint=f"choose from {', '.join(METRICS)}")
    return names


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, macro precision/recall/F1, the confusion matrix (rows: true, columns: predicted)
    and a per-class report (precision, recall, f1, support for each label).

    The definitions are scikit-learn's (macro average over every label, 0 where a ratio is
    0/0), computed from the confusion matrix with numpy: importing sklearn.metrics costs seconds,
    paid by every evaluation of a short fine-tuning run.
    """
    n = len(labels)
    y_true, y_pred = np.asarray(y_true, dtype=np.int64).ravel(), np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ConfigError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    known = (y_true >= 0) & (y_true < n) & (y_pred >= 0) & (y_pred < n)
    matrix = np.bincount(y_true[known] * n + y_pred[known], minlength=n * n).reshape(n, n)
    tp = np.diag(matrix).astype(np.float64)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros(n), where=den > 0)

    precision, recall = ratio(tp, predicted), ratio(tp, support)
    f1 = ratio(2 * tp, predicted + support)
    return {"acc": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
            "precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean()),
            "confusion_matrix": matrix.tolist(),
            "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                 "support": int(support[i])} for i, name in enumerate(labels)}}
