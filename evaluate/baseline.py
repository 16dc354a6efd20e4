"""The classical baseline every annotation is measured against: CellTypist's recipe.

Logistic regression over every gene expressed in the training cells, on log-normalized
expression (counts per 10k, natural log1p) scaled to unit variance without centering and
clipped at 10, L2-penalized with C = 0.1 (CellTypist's defaults, re-implemented here on
scikit-learn). It is what a downstream team would otherwise run: an export that does worse
than this on held-out reference cells should not be used silently (``annotate`` warns).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

CLIP = 10.0
C = 0.1


def log_normalize(counts: Any, target_sum: float = 1e4) -> sp.csr_matrix:
    """Scale each cell to ``target_sum`` counts, then natural log1p (scanpy's normalize_total + log1p)."""
    x = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(x.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    x = sp.csr_matrix(sp.diags(scale) @ x)
    x.data = np.log1p(x.data)
    return x


@dataclass
class LogRegBaseline:
    """Fit on raw counts and string labels; ``predict`` / ``predict_proba`` on raw counts over the same genes."""

    seed: int = 0
    max_iter: int = 1000
    c: float = C

    def fit(self, counts: Any, labels: np.ndarray) -> LogRegBaseline:
        from sklearn.linear_model import LogisticRegression  # lazily: keeps `import evaluate` light

        x = log_normalize(counts)
        self.genes = np.flatnonzero(np.asarray((x != 0).sum(axis=0)).ravel() > 0)
        x = x[:, self.genes]
        mean = np.asarray(x.mean(axis=0)).ravel()
        var = np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean ** 2
        sd = np.sqrt(np.clip(var, 0, None))
        self.inv_sd = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)
        self.model = LogisticRegression(C=self.c, max_iter=self.max_iter, random_state=self.seed)
        self.model.fit(self._features(x), np.asarray(labels).astype(str))
        self.classes = [str(c) for c in self.model.classes_]
        return self

    def _features(self, x: sp.csr_matrix) -> sp.csr_matrix:
        x = sp.csr_matrix(x.multiply(self.inv_sd))
        np.minimum(x.data, CLIP, out=x.data)
        return x

    def predict_proba(self, counts: Any) -> np.ndarray:
        return self.model.predict_proba(self._features(log_normalize(counts)[:, self.genes]))

    def predict(self, counts: Any) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[self.predict_proba(counts).argmax(axis=1)].astype(str)


def logreg_predict(train_x: Any, train_y: np.ndarray, test_x: Any, seed: int = 0) -> np.ndarray:
    """Labels of ``test_x`` from the baseline fitted on ``train_x`` (raw counts over the same genes)."""
    return LogRegBaseline(seed=seed).fit(train_x, train_y).predict(test_x)


DESCRIPTION = "logistic regression on log-normalized expression (CellTypist recipe: scaled, clip 10, C=0.1)"
