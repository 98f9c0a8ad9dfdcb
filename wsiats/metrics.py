"""Classification metrics on slide-level probabilities (scikit-learn does the arithmetic)."""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score


def classification_metrics(targets: np.ndarray, probs: np.ndarray, *, n_classes: int) -> dict[str, object]:
    """Accuracy, balanced accuracy, AUC (one-vs-rest for more than two classes; NaN when a
    class is absent from `targets`) and the confusion matrix (rows: truth, columns: prediction)."""
    targets = np.asarray(targets, dtype=np.int64)
    pred = probs.argmax(1)
    auc = math.nan
    present = np.unique(targets)
    if len(present) == n_classes and n_classes >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if n_classes == 2:
                auc = float(roc_auc_score(targets, probs[:, 1]))
            else:
                auc = float(roc_auc_score(targets, probs, multi_class="ovr", labels=list(range(n_classes))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bacc = float(balanced_accuracy_score(targets, pred))
    return {
        "accuracy": float((pred == targets).mean()),
        "balanced_accuracy": bacc,
        "auc": auc,
        "confusion": confusion_matrix(targets, pred, labels=list(range(n_classes))).tolist(),
    }
