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
from matplotlib.lines import Line2D

from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.metrics import UNASSIGNED, confusion


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


def umap_coordinates(embedding: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-D UMAP [n, 2] of an embedding, seeded so a re-run draws the same picture.

    Exactly the scanpy workflow a user would run on ``obsm["X_<family>"]``:
    ``sc.pp.neighbors(use_rep=...)`` then ``sc.tl.umap``, on a throwaway AnnData so the
    caller's object gains no graph. The first call in a process compiles umap-learn's
    numba code (several seconds); later calls are fast.
    """
    try:
        import anndata
        import scanpy as sc  # lazily: only pictures need it
    except ImportError as e:
        raise EvaluateError("UMAP pictures need scanpy (pip install scanpy); pass umap=False / --no-umap "
                            "to skip them") from e
    x = np.asarray(embedding, dtype=np.float32)
    if len(x) < 4:
        raise EvaluateError(f"UMAP: {len(x)} cells are too few to draw; it needs at least 4")
    tmp = anndata.AnnData(np.zeros((len(x), 0), np.float32))
    tmp.obsm["X_rep"] = x
    sc.pp.neighbors(tmp, use_rep="X_rep", n_neighbors=max(2, min(n_neighbors, len(x) - 1)), random_state=seed)
    sc.tl.umap(tmp, random_state=seed)
    return np.asarray(tmp.obsm["X_umap"])


def _palette(categories: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"] if len(categories) > 10 else colormaps["tab10"]
    known = [c for c in categories if c != UNASSIGNED]
    colours = {c: cmap(i % cmap.N) for i, c in enumerate(known)}
    colours[UNASSIGNED] = (0.75, 0.75, 0.75, 1.0)  # light grey: "no call" should not look like a type
    return colours


def plot_umap(coords: np.ndarray, colourings: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """One UMAP panel per colouring (e.g. {"predicted": ..., "true": ...}) side by side, as a PNG.

    ``coords``: [n, 2] from :func:`umap_coordinates`. Categories share one colour per name across
    panels, so a true type and its prediction look alike; "Unassigned" is grey.
    """
    cats: list[str] = []
    for values in colourings.values():
        cats += [c for c in dict.fromkeys(np.asarray(values).astype(str).tolist()) if c not in cats]
    cats = sorted(c for c in cats if c != UNASSIGNED) + ([UNASSIGNED] if UNASSIGNED in cats else [])
    colours = _palette(cats)
    n = len(colourings)
    fig = Figure(figsize=(5.0 * n + 2.2, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    size = float(np.clip(3000.0 / max(len(coords), 1), 2.0, 30.0))
    for ax, (name, values) in zip(axes, colourings.items()):
        values = np.asarray(values).astype(str)
        for c in cats:
            sel = values == c
            if sel.any():
                ax.scatter(coords[sel, 0], coords[sel, 1], s=size, color=colours[c], label=c, linewidths=0)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP1")
        ax.set_ylabel("UMAP2")
    # one legend for every category of every panel (a class only in "true" still needs its colour named)
    handles = [Line2D([], [], marker="o", linestyle="", color=colours[c], label=c) for c in cats]
    axes[-1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_top_genes(mean: np.ndarray, types: list[str], symbols: list[str], table: Any, path: str | Path,
                   per_type: int = 5, title: str = "") -> Path:
    """Heatmap: rows the cell types, columns the ``per_type`` most attributed genes of each type (in type
    order), colour the mean attribution scaled per gene by its largest absolute value."""
    cols: list[int] = []
    index = {s: i for i, s in reversed(list(enumerate(symbols)))}
    for t in types:
        for sym in table[table["cell_type"] == t].sort_values("rank")["symbol"].head(per_type):
            c = index[sym]
            if c not in cols:
                cols.append(c)
    m = mean[:, cols]
    m = m / np.maximum(np.abs(m).max(axis=0, keepdims=True), 1e-12)
    fig = Figure(figsize=(max(5.0, 0.32 * len(cols) + 2.5), max(3.0, 0.4 * len(types) + 1.8)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), [symbols[c] for c in cols], rotation=75, ha="right", fontsize=7)
    ax.set_yticks(range(len(types)), types, fontsize=8)
    ax.set_title(title or "top genes per cell type (gradient x input, scaled per gene)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_integration(table: Any, path: str | Path, title: str = "") -> Path:
    """Grouped bars: each integration metric (and the batch / bio / total aggregates, after a gap), one
    bar per embedding (a row of ``table``, a DataFrame from ``evaluate.integrate``)."""
    metrics = [c for c in table.columns if c not in ("batch", "bio", "total")]
    cols = [*metrics, "", "batch", "bio", "total"]
    names = [str(i) for i in table.index]
    width = 0.8 / max(len(names), 1)
    fig = Figure(figsize=(min(14.0, 4.0 + 0.35 * len(cols) * max(1, len(names)) ** 0.5), 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = _palette(names)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i, c in enumerate(cols) if c]
        ys = [float(table.loc[name, c]) for c in cols if c]
        ax.bar(xs, ys, width=width, color=colours[name], label=name)
    ax.set_xticks([i for i, c in enumerate(cols) if c], [c for c in cols if c], rotation=40, ha="right",
                  fontsize=8)
    ax.axvline(len(metrics), color="0.7", lw=0.8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (higher is better)")
    ax.set_title(title or "integration (scIB metrics; total = 0.4 batch + 0.6 bio)", fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
