"""Figures written straight to PNG.

Uses matplotlib's object API with the Agg canvas rather than pyplot, so no global
backend is switched and nothing needs a display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evaluate.metrics import confusion


def plot_confusion(y_true: Any, y_pred: Any, path: str | Path, labels: list[str] | None = None,
                   title: str = "") -> Path:
    """Row-normalized confusion matrix (colour = fraction of each true class, text = counts) as a PNG."""
    counts, rows, cols = confusion(y_true, y_pred, labels)
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(cols) + 2.5)
    fig = Figure(figsize=(size, max(3.5, 0.45 * len(rows) + 2.0)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)
    if len(cols) <= 30:  # beyond that the numbers are unreadable; the colours still tell the story
        for i in range(len(rows)):
            for j in range(len(cols)):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="fraction of true class")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
