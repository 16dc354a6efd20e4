"""Benchmark input for the loader benchmark: a synthetic h5ad stored *sorted by cell type*.

The cells come from our own generator (``sharding.synthetic.SyntheticAtlas``: negative
binomial counts, per-type marker programmes, per-dataset batch effects), so every store
in the benchmark is built from the same realistic counts. Two things differ from
``python -m sharding build --source synthetic://...``:

* rows are written sorted by ``cell_type`` (stable: source order within a type), so a
  loader that does not shuffle well shows it in its batches' label entropy;
* the generator's non-zero-proportional sampler is used at every density (the module
  documents it as the same distribution, other random streams), which makes 200k cells
  x 19,331 genes at ~1.5k non-zeros per cell a matter of minutes instead of an hour.

Memory stays bounded by one generation block: blocks are generated (in ``jobs``
processes), each stored on disk as its rows grouped by type (``.npy`` files, read back
memory-mapped), then the h5ad is assembled type by type. X is an uncompressed,
contiguous CSR (float32 data, int32 indices, int64 indptr) so that the h5py sequential
read is a true ceiling; obs has ``cell_type``, ``dataset_id``, ``donor_id``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

BLOCK = 8192
TYPES = 12
DATASETS = 4


def _atlas(cells: int, genes: int, nnz_per_cell: float, seed: int):
    import scpretrain.sharding.synthetic as syn

    syn.SPARSE_DENSITY = 1.0  # the sampler whose cost follows the non-zeros, at any density
    density = min(0.89, nnz_per_cell / genes)
    return syn.SyntheticAtlas(syn.SyntheticParams(cells=cells, genes=genes, types=TYPES, datasets=DATASETS,
                                                  seed=seed, density=density))


_WORKER_ATLAS = None


def _init_worker(cells: int, genes: int, nnz_per_cell: float, seed: int) -> None:
    global _WORKER_ATLAS
    _WORKER_ATLAS = _atlas(cells, genes, nnz_per_cell, seed)


def _gen_block(args: tuple[int, int, int, str]) -> tuple[int, list[str], list[str], list[str], list[str]]:
    """Generate cells [start, stop), save the rows grouped by type (stable) under ``spool/b<k>_*``."""
    k, start, stop, spool = args
    counts, obs = _WORKER_ATLAS.generate(start, stop)
    types = obs["cell_type"].to_numpy().astype(str)
    order = np.argsort(types, kind="stable")
    counts = counts[order]
    base = Path(spool) / f"b{k:05d}"
    np.save(f"{base}_data.npy", counts.data.astype(np.float32, copy=False))
    np.save(f"{base}_indices.npy", counts.indices.astype(np.int32, copy=False))
    np.save(f"{base}_indptr.npy", counts.indptr.astype(np.int64, copy=False))
    o = obs.iloc[order]
    return (k, [str(x) for x in o.index], o["cell_type"].astype(str).tolist(),
            o["dataset_id"].astype(str).tolist(), o["donor_id"].astype(str).tolist())


def write_sorted_h5ad(path: Path, *, cells: int, genes: int, nnz_per_cell: float, seed: int = 0,
                      jobs: int = 2, log=print) -> dict:
    """Write (or reuse, when its parameters match) the type-sorted synthetic h5ad; returns its info."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    path = Path(path)
    stamp = path.with_name(path.name + ".json")
    wanted = {"cells": cells, "genes": genes, "nnz_per_cell": nnz_per_cell, "seed": seed, "types": TYPES,
              "datasets": DATASETS, "sorted_by": "cell_type", "version": 1}
    if path.exists() and stamp.exists():
        info = json.loads(stamp.read_text())
        if info.get("params") == wanted:
            return info
    path.parent.mkdir(parents=True, exist_ok=True)
    spool = path.with_name(path.name + ".spool")
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir()
    t0 = time.perf_counter()
    tasks = [(k, lo, min(lo + BLOCK, cells), str(spool)) for k, lo in enumerate(range(0, cells, BLOCK))]
    obs_parts: dict[int, tuple] = {}
    init = (cells, genes, nnz_per_cell, seed)
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=init) as pool:
            for i, res in enumerate(pool.map(_gen_block, tasks)):
                obs_parts[res[0]] = res[1:]
                log(f"  generating {path.name}: {min((i + 1) * BLOCK, cells):,}/{cells:,} cells")
    else:
        _init_worker(*init)
        for i, t in enumerate(tasks):
            res = _gen_block(t)
            obs_parts[res[0]] = res[1:]
            log(f"  generating {path.name}: {min((i + 1) * BLOCK, cells):,}/{cells:,} cells")
    t_gen = time.perf_counter() - t0

    # assemble: for each type, for each block (source order), that block's rows of the type
    names, ctype, dset, donor = (np.concatenate([np.asarray(obs_parts[k][i], dtype=object)
                                                 for k in range(len(tasks))]) for i in range(4))
    type_names = sorted(set(ctype.tolist()))
    # row range of each type inside each block (rows are grouped by type within a block)
    ranges = {}
    for k in range(len(tasks)):
        t = np.asarray(obs_parts[k][1])
        for name in type_names:
            idx = np.flatnonzero(t == name)
            if len(idx):
                ranges[(name, k)] = (int(idx[0]), int(idx[-1]) + 1)
    order = np.lexsort((np.arange(len(ctype)), np.searchsorted(type_names, ctype.astype(str))))
    total_nnz = 0
    for k in range(len(tasks)):
        total_nnz += int(np.load(spool / f"b{k:05d}_indptr.npy", mmap_mode="r")[-1])
    tmp = path.with_name(path.name + ".tmp")
    obs = pd.DataFrame({"cell_type": pd.Categorical(ctype[order].astype(str), categories=type_names),
                        "dataset_id": pd.Categorical(dset[order].astype(str)),
                        "donor_id": pd.Categorical(donor[order].astype(str))},
                       index=pd.Index(names[order].astype(str)))
    var = pd.DataFrame({"symbol": [f"SYNG{j + 1:05d}" for j in range(genes)]},
                       index=pd.Index([f"ENSG{j + 1:011d}" for j in range(genes)]))
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        x = f.create_group("X")
        x.attrs["encoding-type"] = "csr_matrix"
        x.attrs["encoding-version"] = "0.1.0"
        x.attrs["shape"] = np.array([cells, genes], dtype=np.int64)
        d_data = x.create_dataset("data", shape=(total_nnz,), dtype=np.float32)  # contiguous, uncompressed
        d_idx = x.create_dataset("indices", shape=(total_nnz,), dtype=np.int32)
        d_ptr = x.create_dataset("indptr", shape=(cells + 1,), dtype=np.int64)
        row, pos = 0, 0
        d_ptr[0:1] = 0
        for name in type_names:
            for k in range(len(tasks)):
                if (name, k) not in ranges:
                    continue
                a, b = ranges[(name, k)]
                ptr = np.load(spool / f"b{k:05d}_indptr.npy", mmap_mode="r")
                lo, hi = int(ptr[a]), int(ptr[b])
                data = np.load(spool / f"b{k:05d}_data.npy", mmap_mode="r")
                idx = np.load(spool / f"b{k:05d}_indices.npy", mmap_mode="r")
                d_data[pos:pos + hi - lo] = data[lo:hi]
                d_idx[pos:pos + hi - lo] = idx[lo:hi]
                d_ptr[row + 1:row + 1 + b - a] = np.asarray(ptr[a + 1:b + 1]) - lo + pos
                row += b - a
                pos += hi - lo
        assert row == cells and pos == total_nnz, (row, cells, pos, total_nnz)
    os.replace(tmp, path)
    shutil.rmtree(spool, ignore_errors=True)
    counts = obs["cell_type"].value_counts().reindex(type_names).astype(int).tolist()
    info = {"params": wanted, "path": str(path), "n_cells": cells, "n_genes": genes, "nnz": total_nnz,
            "nnz_per_cell": total_nnz / max(cells, 1), "types": type_names, "type_counts": counts,
            "generate_s": round(t_gen, 1), "total_s": round(time.perf_counter() - t0, 1),
            "bytes": path.stat().st_size}
    stamp.write_text(json.dumps(info, indent=1))
    _ = ad  # anndata is imported for write_elem's registry
    return info


def h5ad_labels(path: Path, types: list[str]) -> np.ndarray:
    """cell_type code (index into ``types``) of every row of the h5ad."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        ct = read_elem(f["obs"]["cell_type"])
    return np.searchsorted(np.asarray(types), np.asarray(ct).astype(str)).astype(np.int16)


def corpus_labels(corpus: Path, types: list[str]) -> np.ndarray:
    """cell_type code indexed by the corpus's global ``cell_id`` (read from its Zarr shards' obs)."""
    import zarr

    from scpretrain.sharding.manifest import read_manifest

    m = read_manifest(corpus)
    if not m.get("zarr"):
        return soma_labels(corpus / m["soma"]["path"], types, by="cell_id")
    out = np.full(int(m["n_cells"]), -1, dtype=np.int16)
    ids, codes = [], []
    for s in m["zarr"]["shards"]:
        g = zarr.open_group(str(corpus / s["path"]), mode="r")
        cid = np.asarray(g["obs/cell_id"][:], dtype=np.int64)
        node = g["obs/cell_type"]
        if isinstance(node, zarr.Group):
            cats = np.asarray(node["categories"][:]).astype(object).astype(str)
            lab = cats[np.asarray(node["codes"][:])]
        else:
            lab = np.asarray(node[:]).astype(object).astype(str)
        ids.append(cid)
        codes.append(np.searchsorted(np.asarray(types), lab))
    ids_all = np.concatenate(ids)
    if ids_all.max(initial=-1) >= len(out):
        out = np.full(int(ids_all.max()) + 1, -1, dtype=np.int16)
    out[ids_all] = np.concatenate(codes)
    return out


def soma_labels(uri: Path, types: list[str], by: str = "soma_joinid") -> np.ndarray:
    """cell_type code indexed by ``soma_joinid`` (or by the ``cell_id`` obs column)."""
    import tiledbsoma

    with tiledbsoma.Experiment.open(str(uri)) as exp:
        tbl = exp.obs.read(column_names=[by, "cell_type"]).concat()
    key = tbl.column(by).to_numpy()
    lab = np.asarray(tbl.column("cell_type").to_pylist()).astype(str)
    out = np.full(int(key.max()) + 1 if len(key) else 0, -1, dtype=np.int16)
    out[key] = np.searchsorted(np.asarray(types), lab)
    return out


def write_sorted_soma(h5ad: Path, uri: Path, rows: int = 16384, log=print) -> None:
    """The source h5ad, in its type-sorted row order, as a SOMA experiment written by our SOMA writer
    (``sharding.soma_store``): soma_joinid = h5ad row, obs ``cell_id`` = row, ``cell_type``. A stand-in for an
    external store sorted by cell type (``tiledbsoma.io.from_anndata`` ran > 8 minutes on 200k cells here)."""
    import anndata as ad
    import h5py
    import scipy.sparse as sp

    from scpretrain.sharding import soma_store

    a = ad.read_h5ad(h5ad, backed="r")
    genes = [(str(g), str(g)) for g in a.var_names]
    ctype = np.asarray(a.obs["cell_type"]).astype(str)
    n = a.n_obs
    a.file.close()
    soma_store.create_experiment(uri, n_cells=n, genes=genes, obs_columns=["cell_id", "cell_type"])
    with h5py.File(h5ad, "r") as f:
        x = f["X"]
        ptr = x["indptr"][:]
        for lo in range(0, n, rows):
            hi = min(lo + rows, n)
            a0, b0 = int(ptr[lo]), int(ptr[hi])
            csr = sp.csr_matrix((x["data"][a0:b0], x["indices"][a0:b0], ptr[lo:hi + 1] - a0),
                                shape=(hi - lo, len(genes)))
            obs = pd.DataFrame({"cell_id": np.arange(lo, hi, dtype=np.int64), "cell_type": ctype[lo:hi]})
            soma_store.write_rows(uri, lo, csr, obs, replace=False)
            log(f"  sorted SOMA: {hi:,}/{n:,} cells")
