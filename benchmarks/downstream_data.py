"""A labelled dataset no part of the project generated for training: for judging `evaluate annotate`.

Its generative recipe differs from ``sharding.synthetic`` (the demo corpus): lineages with
shared programmes, cell types distinguished only by weak markers (1.6-2.4 fold), strong
imbalance (30% down to 2%), two batches with their own gene-wise factors and compositions,
a different library-size and dispersion model, and genes taken from an export's vocabulary.
Batch "A" is the reference, batch "B" the query.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

TYPES = ("T naive", "T memory", "T cytotoxic", "NK", "B", "plasma", "monocyte", "dendritic")
LINEAGE = (0, 0, 0, 0, 1, 1, 2, 2)
SHARES = np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02])


def make(genes: list[str], n_cells: int = 4000, seed: int = 7) -> Any:
    import anndata

    rng = np.random.default_rng(seed)
    g = len(genes)
    base = rng.lognormal(mean=-1.0, sigma=1.6, size=g)
    base /= base.sum()
    fold = np.zeros((len(TYPES), g))
    for lin in range(3):  # lineage programmes: 60 genes, 2.5-fold, shared by the lineage's types
        prog = rng.choice(g, 60, replace=False)
        for t in np.flatnonzero(np.asarray(LINEAGE) == lin):
            fold[t, prog] += np.log(2.5)
    for t in range(len(TYPES)):  # weak type markers: 20 genes, 1.6-2.4 fold
        fold[t, rng.choice(g, 20, replace=False)] += np.log(rng.uniform(1.6, 2.4, 20))
    batches = ("A", "B")
    batch = np.repeat(batches, n_cells // 2)
    labels = np.empty(len(batch), dtype=object)
    for b in batches:  # each batch its own composition around the shared imbalance
        comp = rng.dirichlet(SHARES * 200)
        idx = np.flatnonzero(batch == b)
        labels[idx] = rng.choice(TYPES, len(idx), p=comp)
    ti = np.array([TYPES.index(t) for t in labels])
    batch_factor = {b: rng.lognormal(0.0, 0.35, g) for b in batches}
    lib = rng.lognormal(mean=np.log(2500), sigma=0.45, size=len(batch))
    rows = []
    for i in range(len(batch)):
        mu = base * np.exp(fold[ti[i]]) * batch_factor[batch[i]]
        mu = lib[i] * mu / mu.sum()
        disp = 0.15
        lam = rng.gamma(1.0 / disp, mu * disp)
        rows.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    x = sp.vstack(rows).tocsr()
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels, categories=TYPES), "batch": batch},
                       index=[f"cell{i:05d}" for i in range(len(batch))])
    return anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=list(genes)))


def write_split(genes: list[str], out: Path, n_cells: int = 4000, seed: int = 7) -> tuple[Path, Path]:
    """reference.h5ad (batch A) and query.h5ad (batch B) under ``out``."""
    a = make(genes, n_cells, seed)
    out.mkdir(parents=True, exist_ok=True)
    ref, query = out / "reference.h5ad", out / "query.h5ad"
    a[a.obs["batch"] == "A"].copy().write_h5ad(ref)
    a[a.obs["batch"] == "B"].copy().write_h5ad(query)
    return ref, query
