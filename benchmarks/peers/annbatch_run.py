"""annbatch (scverse): build its own pre-shuffled collection from the h5ad, or load from it.

Runs in ``venv-annbatch`` (Python >= 3.12), with the zarrs (Rust) codec pipeline that
annbatch's docs call essential on a local filesystem.

Spec ``mode``:
* ``build``: ``DatasetCollection(store).add_adatas([h5ad], shuffle=True, ...)`` with
  ``n_obs_per_chunk``, ``dataset_size`` (rows held in memory per output dataset) and
  ``shuffle_chunk_size`` (contiguous source rows per slice mixed into a dataset);
* ``load``: ``Loader(batch_size, chunk_size, preload_nchunks, shuffle=True,
  preload_to_gpu=False, return_index=True)`` over the collection; X comes out as scipy CSR.
  Only X is loaded (obs without columns), labels are looked up by the returned index
  (global row of the collection) from the collection's obs, read before timing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _harness import Meter, maxrss_mb, run, versions

VERSIONS = ("annbatch", "zarrs", "zarr", "anndata", "numba", "scipy")


def _zarrs() -> None:
    import zarr

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


def build(spec: dict) -> None:
    import json

    from annbatch import DatasetCollection

    _zarrs()
    t0 = time.perf_counter()
    coll = DatasetCollection(spec["store"])
    n = int(spec["n_cells"])
    coll.add_adatas([spec["h5ad"]], shuffle=True, n_obs_per_chunk=int(spec.get("n_obs_per_chunk", 64)),
                    dataset_size=min(n, int(spec.get("dataset_size", 65536))),
                    shuffle_chunk_size=min(int(spec.get("shuffle_chunk_size", 1000)), n),
                    rng=np.random.default_rng(int(spec.get("seed", 0))))
    secs = time.perf_counter() - t0
    me, kids = maxrss_mb()
    Path(spec["result"]).write_text(json.dumps({"status": "ok", "seconds": secs, "cells": n,
                                                "maxrss_self_mb": me, "maxrss_children_mb": kids,
                                                "versions": versions(*VERSIONS)}))


def load(spec: dict) -> None:
    import anndata as ad
    import pandas as pd
    from annbatch import DatasetCollection, Loader

    _zarrs()
    types = np.asarray(spec["types"])
    coll = DatasetCollection(spec["store"], mode="r")
    labels = []

    def load_x_only(g) -> ad.AnnData:
        x = ad.io.sparse_dataset(g["X"])
        var = g["var"]
        var_index = pd.Index(ad.io.read_elem(var[var.attrs.get("_index", "_index")]))
        ct = np.asarray(ad.io.read_elem(g["obs"]["cell_type"])).astype(str)  # labels only, not yielded
        labels.append(np.searchsorted(types, ct))
        return ad.AnnData(X=x, obs=pd.DataFrame(index=pd.RangeIndex(x.shape[0]).astype(str)),
                          var=pd.DataFrame(index=var_index))

    def make(seed: int) -> Loader:
        return Loader(batch_size=int(spec["batch_size"]), chunk_size=int(spec.get("chunk_size", 64)),
                      preload_nchunks=int(spec.get("preload_nchunks", 256)), shuffle=True,
                      preload_to_gpu=False, return_index=True, rng=np.random.default_rng(seed))

    meter = Meter(spec, n_types=len(types))
    seed = int(spec.get("seed", 0))
    if spec.get("warmup", True):
        meter.warmup(make(seed + 1).use_collection(coll, load_adata=load_x_only), batches=1)
        labels.clear()
    loader = make(seed).use_collection(coll, load_adata=load_x_only)
    lab = np.concatenate(labels)
    for _ in range(int(spec.get("warm_passes", 0))):  # steady state: whole untimed passes first
        n = 0
        for batch in loader:
            n += batch["X"].shape[0]
            if meter.target and n >= meter.target:
                break
    meter.start()
    out_type = None
    for batch in loader:
        x = batch["X"]
        out_type = out_type or type(x).__name__
        if meter.add(x.shape[0], lab[batch["index"]]):
            break
    meter.finish(versions=versions(*VERSIONS), output=out_type, n_datasets=len(labels))


def main(spec: dict) -> None:
    {"build": build, "load": load}[spec["mode"]](spec)


if __name__ == "__main__":
    run(main)
