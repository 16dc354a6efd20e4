"""Data integration metrics: how well an embedding mixes batches while keeping cell types apart.

The scIB benchmark (Luecken et al., Nat. Methods 2022), as the SSL paper (Richter et al. 2024) scores its
embeddings, computed by the field's own library, ``scib-metrics`` (0.5.x on Python 3.11; the JAX CPU build).
Every metric is in [0, 1], higher is better (ARI is chance-adjusted: a random embedding scores about 0
and may dip just below it, reported as it is, as scIB does):

batch correction   ``batch_asw`` (1 - |silhouette| of batches within each type), ``ilisi`` (scaled
                   inverse Simpson's index of batches in each cell's neighbourhood), ``kbet`` (kBET
                   acceptance rate per type), ``graph_connectivity`` (each type's cells connected in the
                   kNN graph)
bio conservation   ``label_asw`` (silhouette of types, rescaled), ``nmi`` / ``ari`` (k-means clusters vs
                   types), ``isolated_label`` (silhouette of the types found in the fewest batches),
                   ``clisi`` (scaled cLISI: neighbourhoods of one type)

``batch`` and ``bio`` are the means of their groups and ``total = 0.4 batch + 0.6 bio``, scIB's weights,
on the metrics as they come (no min-max scaling across embeddings, so one call's rows stay comparable to
another's). The principal-component-regression score is left out: it compares an embedding with the
unintegrated data and is undefined for the unintegrated baseline itself.

The baseline, computed in the same call unless switched off: PCA (50 components) of log-normalized
expression (counts per 10k, log1p) of all the data's genes, the "unintegrated" row of scIB tables.
The kNN graph is exact (scikit-learn, Euclidean), with the neighbour counts of scib-metrics' Benchmarker:
90 for iLISI and cLISI, 50 for kBET, 15 for graph connectivity, each cell its own first neighbour.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scpretrain.evaluate.errors import EvaluateError

BATCH_METRICS = ("batch_asw", "ilisi", "kbet", "graph_connectivity")
BIO_METRICS = ("label_asw", "nmi", "ari", "isolated_label", "clisi")
AGGREGATES = ("batch", "bio", "total")
BATCH_WEIGHT = 0.4
N_NEIGHBORS = 90
BASELINE = "X_pca_baseline"
INSTALL = "pip install 'scpretrain[integrate]' (scib-metrics)"


@dataclass(frozen=True)
class Groups:
    """Labels and batches as integer codes, with their names."""

    labels: np.ndarray
    batches: np.ndarray
    label_names: list[str]
    batch_names: list[str]


def groups(adata: Any, label_key: str, batch_key: str, name: str = "adata") -> Groups:
    """Codes of ``obs[label_key]`` and ``obs[batch_key]``; refused when a key is missing, has missing
    values, or (batches) holds a single value."""
    import pandas as pd

    if adata.n_obs < 3:
        raise EvaluateError(f"{name}: {adata.n_obs} cell(s); integration metrics need at least 3 cells")
    codes = []
    for role, key in (("label", label_key), ("batch", batch_key)):
        if key not in adata.obs.columns:
            cols = ", ".join(map(str, list(adata.obs.columns)[:12])) or "none"
            raise EvaluateError(f"{name}: obs has no column {key!r} (--{role}-key); columns: {cols}")
        col = adata.obs[key]
        n_missing = int(col.isna().sum())
        if n_missing:
            raise EvaluateError(f"{name}: obs[{key!r}] (--{role}-key) is missing for {n_missing:,} cell(s); "
                                "drop those cells or fill the column")
        code, names = pd.factorize(col.astype(str), sort=True)
        if len(names) < 2:
            what = "batch" if role == "batch" else "label"
            raise EvaluateError(f"{name}: obs[{key!r}] (--{role}-key) has one {what} ({names[0]!r}); "
                                f"integration metrics need at least two; pass a --{role}-key with several")
        codes.append((code.astype(np.int32), [str(n) for n in names]))
    (lab, lab_names), (bat, bat_names) = codes
    return Groups(lab, bat, lab_names, bat_names)


def check_embedding(emb: Any, n_obs: int, what: str) -> np.ndarray:
    """A finite float32 [n_obs, d] matrix, or a clear error naming ``what``."""
    x = np.asarray(emb.toarray() if hasattr(emb, "toarray") else emb)
    if x.ndim != 2 or x.shape[0] != n_obs:
        raise EvaluateError(f"{what}: shape {tuple(x.shape)} does not match the data's {n_obs:,} cells; "
                            "pass an embedding with one row per cell, in the data's order")
    if x.shape[1] < 1:
        raise EvaluateError(f"{what}: has no columns")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise EvaluateError(f"{what}: holds NaN/inf or non-numbers; recompute it")
    return x.astype(np.float32, copy=False)


def pca_baseline(adata: Any, n_comps: int = 50, layer: str | None = None, seed: int = 0,
                 name: str = "adata") -> np.ndarray:
    """PCA of log-normalized expression over all genes (raw counts in X / the layer; values already
    normalized are used as they are, with a note)."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    from scpretrain.evaluate.align import _problem, count_source
    from scpretrain.evaluate.baseline import log_normalize

    x, _, _, where = count_source(adata, layer, name)
    x = sp.csr_matrix(x, dtype=np.float64)
    problem = _problem(x.data)
    if problem is None:
        x = log_normalize(x)
    elif "NaN" in problem or "negative" in problem:
        raise EvaluateError(f"{name}: {where} has {problem}; the PCA baseline needs raw counts (pass --layer) "
                            "or switch it off (--no-baseline)")
    else:
        print(f"{name}: {where} is not raw counts ({problem}); the PCA baseline uses it as it is")
    n = min(n_comps, x.shape[0] - 1, x.shape[1] - 1)
    pca = PCA(n_components=n, svd_solver="arpack", random_state=seed)
    return pca.fit_transform(x).astype(np.float32)


def _scib() -> Any:
    try:
        import scib_metrics
    except ImportError:
        raise EvaluateError(f"integration metrics need the scib-metrics package: {INSTALL}") from None
    return scib_metrics


def _aggregate(row: dict[str, float]) -> dict[str, float]:
    batch = float(np.mean([row[m] for m in BATCH_METRICS]))
    bio = float(np.mean([row[m] for m in BIO_METRICS]))
    return {"batch": batch, "bio": bio, "total": BATCH_WEIGHT * batch + (1 - BATCH_WEIGHT) * bio}


def _scaled_lisi(sm: Any, knn: Any, codes: np.ndarray, what: str) -> float:
    """scib-metrics' ilisi_knn (``what="batches"``) / clisi_knn (``"labels"``): the median per-cell LISI,
    scaled, computed from ``lisi_knn`` so the cells whose perplexity search failed are counted (the
    library gives them LISI -1 and takes the median anyway). Over 5% of them is refused."""
    lisi = np.asarray(sm.lisi_knn(knn, codes))
    failed = int((lisi < 0).sum())
    if failed > 0.05 * len(lisi):
        raise EvaluateError(f"LISI of {what}: the neighbourhood of {failed:,} of {len(lisi):,} cells is "
                            "degenerate (tied distances, e.g. duplicated cells, or more tied nearest neighbours "
                            f"than the perplexity {knn.indices.shape[1] // 3}); drop duplicated cells or use more "
                            "neighbours")
    n = len(np.unique(codes))
    med = float(np.nanmedian(lisi))
    return (med - 1) / (n - 1) if what == "batches" else (n - med) / (n - 1)


def integration_metrics(emb: np.ndarray, g: Groups, n_neighbors: int = N_NEIGHBORS,
                        verbose: bool = False) -> dict[str, float]:
    """The nine metrics and three aggregates of one embedding (see the module docstring); scib-metrics'
    k-means (NMI/ARI) is seeded inside the library, so a call is deterministic."""
    sm = _scib()
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    times: dict[str, float] = {}

    def timed(key: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.time()
        out = fn(*a, **kw)
        times[key] = time.time() - t0
        return out

    # as scib-metrics' Benchmarker: one kNN search (each cell its own first neighbour), its first 90
    # columns for the LISIs, 50 for kBET, 15 for graph connectivity
    k = min(n_neighbors, len(emb))
    dist, idx = timed("neighbours", NearestNeighbors(n_neighbors=k).fit(emb).kneighbors, emb)
    knn = NeighborsResults(indices=idx.astype(np.int32), distances=dist.astype(np.float32))
    nn = {"lisi": knn, "kbet": knn.subset_neighbors(min(50, k)), "graph": knn.subset_neighbors(min(15, k))}
    lab, bat = g.labels, g.batches
    row = {
        "batch_asw": timed("batch_asw", sm.silhouette_batch, emb, lab, bat),
        "ilisi": timed("ilisi", _scaled_lisi, sm, nn["lisi"], bat, "batches"),
        "kbet": timed("kbet", sm.kbet_per_label, nn["kbet"], bat, lab),
        "graph_connectivity": timed("graph_connectivity", sm.graph_connectivity, nn["graph"], lab),
        "label_asw": timed("label_asw", sm.silhouette_label, emb, lab),
        **timed("nmi_ari", sm.nmi_ari_cluster_labels_kmeans, emb, lab),
        "isolated_label": timed("isolated_label", sm.isolated_labels, emb, lab, bat),
        "clisi": timed("clisi", _scaled_lisi, sm, nn["lisi"], lab, "labels"),
    }
    row = {m: float(row[m]) for m in (*BATCH_METRICS, *BIO_METRICS)}
    for m, v in row.items():
        if math.isnan(v):
            raise EvaluateError(f"integration metric {m} is NaN for this embedding: too few cells per type and "
                                "batch for it, or an embedding without variance; score more cells")
    if verbose:
        slow = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:3])
        print(f"  metrics in {sum(times.values()):.1f} s (slowest: {slow})")
    return {**row, **_aggregate(row)}


def integrate(
    adata: Any,
    embeddings: list[str] | dict[str, Any],
    batch_key: str,
    label_key: str,
    *,
    baseline: bool = True,
    layer: str | None = None,
    n_neighbors: int = N_NEIGHBORS,
    seed: int = 0,
    verbose: bool = True,
) -> Any:
    """One row of metrics per embedding (a pandas DataFrame indexed by name), the PCA baseline first.

    ``embeddings``: keys of ``adata.obsm``, or {name: [n_obs, d] array}. Everything is checked before the
    first metric runs: the keys, the batches (at least two), the labels, every embedding's shape.
    """
    import pandas as pd

    g = groups(adata, label_key, batch_key)
    _scib()
    if isinstance(embeddings, dict):
        named = {str(k): check_embedding(v, adata.n_obs, f"embedding {k!r}") for k, v in embeddings.items()}
    else:
        named = {}
        for key in embeddings:
            if key not in adata.obsm:
                have = ", ".join(adata.obsm.keys()) or "none"
                raise EvaluateError(f"adata: obsm has no embedding {key!r}; available: {have} "
                                    "(`python -m evaluate embed` writes X_mae / X_performer)")
            named[key] = check_embedding(adata.obsm[key], adata.n_obs, f"obsm[{key!r}]")
    if not named and not baseline:
        raise EvaluateError("integrate: no embedding to score; name one or keep the PCA baseline")
    if baseline:
        t0 = time.time()
        named = {BASELINE: pca_baseline(adata, layer=layer, seed=seed), **named}
        if verbose:
            print(f"PCA baseline ({named[BASELINE].shape[1]} components of log-normalized expression, "
                  f"{adata.n_vars:,} genes) in {time.time() - t0:.1f} s")
    if verbose:
        print(f"{adata.n_obs:,} cells, {len(g.batch_names)} batches ({', '.join(g.batch_names[:6])}), "
              f"{len(g.label_names)} labels")
    rows = {}
    for name, emb in named.items():
        if verbose:
            print(f"{name} ({emb.shape[1]} dims)")
        rows[name] = integration_metrics(emb, g, n_neighbors=n_neighbors, verbose=verbose)
    table = pd.DataFrame.from_dict(rows, orient="index")[[*BATCH_METRICS, *BIO_METRICS, *AGGREGATES]]
    table.index.name = "embedding"
    return table


def subsample(n_obs: int, max_cells: int | None, seed: int = 0) -> np.ndarray | None:
    """Row indices of a seeded random draw of ``max_cells`` cells (sorted), or None to keep them all."""
    if max_cells is None or max_cells >= n_obs:
        return None
    if max_cells < 3:
        raise EvaluateError(f"integrate: max_cells is {max_cells}; pass at least 3")
    return np.sort(np.random.default_rng(seed).choice(n_obs, size=max_cells, replace=False))


def write_results(table: Any, out_dir: str | Path, meta: dict[str, Any]) -> list[Path]:
    """``integration.tsv``, ``integration.json`` (the table and ``meta``) and ``integration.png`` in
    ``out_dir``, each written to a temporary name first and renamed (no half-written file)."""
    import json
    import os

    from scpretrain.evaluate.plots import plot_integration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "integration.tsv", out / "integration.json", out / "integration.png"]
    tmp = [p.with_name(f".{p.name}.tmp-{os.getpid()}{p.suffix}") for p in paths]
    table.round(4).to_csv(tmp[0], sep="\t")
    doc = {**meta, "metrics": {"batch": list(BATCH_METRICS), "bio": list(BIO_METRICS)},
           "weights": {"batch": BATCH_WEIGHT, "bio": 1 - BATCH_WEIGHT},
           "scores": {str(k): {c: float(v) for c, v in row.items()} for k, row in table.iterrows()}}
    tmp[1].write_text(json.dumps(doc, indent=2))
    plot_integration(table, tmp[2])
    for t, p in zip(tmp, paths):
        os.replace(t, p)
    return paths


def library_version() -> str:
    from importlib.metadata import version

    return f"scib-metrics {version('scib-metrics')}"
