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
    and a per-class report (precision, recall, f1, support for each label)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    index = list(range(len(labels)))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=index, average="macro", zero_division=0)
    pc, rc, fc, support = precision_recall_fscore_support(y_true, y_pred, labels=index, average=None, zero_division=0)
    return {"acc": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
            "precision": float(p), "recall": float(r), "f1": float(f),
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=index).tolist(),
            "per_class": {name: {"precision": float(pc[i]), "recall": float(rc[i]), "f1": float(fc[i]),
                                 "support": int(support[i])} for i, name in enumerate(labels)}}
