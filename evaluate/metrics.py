"""Classification metrics on string labels (sklearn underneath)."""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

# the label annotate gives a cell no class is confident enough for (below its threshold)
UNASSIGNED = "Unassigned"


def classification_metrics(y_true: Any, y_pred: Any, labels: list[str] | None = None) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class precision / recall / F1 / support.

    ``labels`` (default: the classes present in ``y_true``) are the classes averaged
    over; a prediction outside them (e.g. "Unassigned") counts as wrong. Classes never
    predicted score 0 rather than raising.
    """
    y_true = np.asarray(y_true).astype(str)
    y_pred = np.asarray(y_pred).astype(str)
    labels = sorted(set(y_true.tolist())) if labels is None else [str(c) for c in labels]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                          "support": int(s[i])} for i, c in enumerate(labels)},
    }


def confusion(y_true: Any, y_pred: Any,
              labels: list[str] | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """(counts [n_true_labels, n_pred_labels], row labels, column labels).

    Columns are the row labels plus any other predicted value (such as "Unassigned"), so
    no prediction disappears from the matrix.
    """
    y_true = np.asarray(y_true).astype(str)
    y_pred = np.asarray(y_pred).astype(str)
    rows = sorted(set(y_true.tolist())) if labels is None else [str(c) for c in labels]
    cols = rows + sorted(set(y_pred.tolist()) - set(rows))
    m = confusion_matrix(y_true, y_pred, labels=cols)
    return m[: len(rows)], rows, cols
