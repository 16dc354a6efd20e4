"""Phase 2 of a build: each shard's rows read back from every phase-1 spool, shuffled and written (Zarr shard
and/or its rows of the SOMA experiment), then marked done in DIR/.build/done/."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scpretrain.scmodels.atomic import fsync_dir, fsync_tree
from scpretrain.sharding import manifest as mf
from scpretrain.sharding import zarr_store
from scpretrain.sharding.assemble import CATEGORICAL_MAX, COUNTED
from scpretrain.sharding.spool import Categories, ShardSpool
from scpretrain.sharding.vocab import Vocab

AUTO_JOBS_MIN_CELLS = 100_000  # below this, --jobs 0 (auto) writes shards in the main process


def done_shards(build_dir: Path) -> dict[int, dict[str, Any]]:
    done = {}
    for p in sorted((build_dir / "done").glob("shard-*.json")):
        done[int(p.stem.split("-")[1])] = json.loads(p.read_text())
    return done


def pass2_jobs(jobs: int, n_cells: int, n_todo: int) -> int:
    """Worker processes for pass 2: ``jobs``, or for 0 (auto) one per core up to 4 when the corpus is big
    enough to repay starting them (a spawned worker costs 1-2 s of imports). Not the default: on the
    2-core development machine, shared with other work, two workers were slower than one (no idle core,
    plus the imports); `benchmarks/bench_corpus.py` measures both on a quiet machine."""
    if jobs == 0:
        jobs = min(4, os.cpu_count() or 1) if n_cells >= AUTO_JOBS_MIN_CELLS else 1
    return max(1, min(jobs, n_todo))


@dataclass
class ShardJob:
    """What writing one shard needs; sent once to each worker process."""

    out: Path
    seed: int
    codec: str
    x_dtype: str
    format: str
    n_shards: int
    n_genes: int
    spool_bytes: int
    string_cols: list[str]
    categories: dict[str, list[str]]
    var: pd.DataFrame
    offsets: np.ndarray
    soma_resumed: bool
    spools: list[Path]  # one per phase-1 task, in input order
    remaps: list[dict[str, np.ndarray]]  # per phase-1 task: its local category codes -> the corpus's
    dropped: np.ndarray  # sorted input-row positions dropped by --min-genes, over all tasks


_WORKER: ShardJob | None = None  # set in each pass-2 worker process by init_worker


def init_worker(job: ShardJob) -> None:
    global _WORKER
    _WORKER = job


def write_shard_in_worker(shard: int) -> None:
    assert _WORKER is not None
    write_shard(_WORKER, shard)


def read_rows(job: ShardJob, shard: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """The shard's rows in input order: every phase-1 task's spool in turn, codes in the corpus's
    categories, cell_id = the row's position among all kept rows."""
    parts = []
    for root, remap in zip(job.spools, job.remaps):
        spool = ShardSpool(root, job.n_shards, job.n_genes, len(job.string_cols), job.spool_bytes)
        csr, rows, codes = spool.read(shard)
        for i, col in enumerate(job.string_cols):
            if len(codes):
                codes[:, i] = remap[col][codes[:, i]]
        parts.append((csr, rows, codes))
    dtype = np.uint16 if all(p[0].dtype == np.uint16 for p in parts) else np.float32  # a widened spool: float32
    csr = sp.vstack([p[0] for p in parts], format="csr", dtype=dtype) if len(parts) > 1 else parts[0][0]
    rows = np.concatenate([p[1] for p in parts])
    codes = np.concatenate([p[2] for p in parts])
    cell_ids = rows - np.searchsorted(job.dropped, rows)
    return csr, cell_ids.astype(np.int64), codes


@dataclass
class ShardRows:
    """One shard's rows in its shuffled order."""

    csr: sp.csr_matrix
    cell_ids: np.ndarray
    codes: np.ndarray


def shuffled_rows(job: ShardJob, shard: int) -> ShardRows:
    """One shard's spooled rows, in the shard's shuffled order: all of a shard's work that holds no shared state,
    so phase 2 runs it for the next shard while this one is written. (Laying out SOMA's Arrow table there too
    was slower: two shards' tables, 0.9 GB, and more page faults than the overlap saved.)"""
    csr, cell_ids, codes = read_rows(job, shard)
    perm = np.random.default_rng([job.seed, 2, shard]).permutation(csr.shape[0])
    return ShardRows(csr[perm], cell_ids[perm], codes[perm])


def write_shard(job: ShardJob, shard: int, rows: ShardRows | None = None) -> None:
    """Write one shard's rows (``rows``, else read back and shuffled here) as its Zarr store and/or SOMA rows,
    then mark it done."""
    build_dir = job.out / ".build"
    rows = rows if rows is not None else shuffled_rows(job, shard)
    csr, cell_ids, codes = rows.csr, rows.cell_ids, rows.codes
    obs = pd.DataFrame({"cell_id": cell_ids}, index=pd.Index(cell_ids.astype(str)))
    for i, col in enumerate(job.string_cols):
        cats = job.categories[col]
        if len(cats) <= CATEGORICAL_MAX:
            # categorical over the corpus-wide category list (also in the manifest): the loader reads a
            # shard's integer codes directly, with no per-cell strings
            obs[col] = pd.Categorical.from_codes(codes[:, i], categories=cats)
        else:  # e.g. barcodes: every shard repeating the whole list would cost more than the strings
            obs[col] = Categories(cats).decode(codes[:, i])
    record = {"n_cells": int(csr.shape[0]), "nnz": int(csr.nnz), "sha256": None,
              "counts": {c: {str(k): int(v) for k, v in obs[c].value_counts().items() if v} for c in COUNTED}}
    if job.format != "soma":
        record["sha256"], record["dtypes"] = write_zarr_shard(job.out, shard, csr, obs, job.var, job.codec,
                                                              job.x_dtype)
    if job.format != "zarr":
        from scpretrain.sharding import soma_store  # only SOMA builds import tiledbsoma

        soma_store.write_rows(job.out / "soma", int(job.offsets[shard]), csr, obs, replace=job.soma_resumed)
        # SOMA X is int64 x float32; these are the dtypes the loader hands out: the Zarr shards' rule, so the
        # Zarr shard's own when this shard was just written as one too (no second pass over its counts)
        dtypes = record.get("dtypes") or {k: v.name for k, v in zarr_store.x_dtypes(csr, job.x_dtype).items()}
        record["soma_dtypes"] = {k: dtypes[k] for k in ("indices", "data")}
    mf.write_atomic(build_dir / "done" / f"shard-{shard:05d}.json", json.dumps(record).encode())
    for root in job.spools:  # disk use falls as phase 2 goes
        shutil.rmtree(root / f"shard-{shard:05d}", ignore_errors=True)


def soma_ready(build_dir: Path, uri: Path, n_cells: int, vocab: Vocab, string_cols: list[str]) -> bool:
    """Create the experiment unless a previous run did; True when rows may already exist (resume)."""
    marker = build_dir / "soma.created"
    if marker.exists() and uri.exists():
        return True
    shutil.rmtree(uri, ignore_errors=True)  # half-created by a crash: start it again
    from scpretrain.sharding import soma_store

    soma_store.create_experiment(uri, n_cells=n_cells, genes=vocab.pairs(), obs_columns=["cell_id"] + string_cols)
    marker.touch()
    return False


def write_zarr_shard(out: Path, shard: int, csr: Any, obs: pd.DataFrame, var: pd.DataFrame,
                     codec: str, x_dtype: str) -> tuple[str, dict[str, str]]:
    # write beside the final name and rename: a crash never leaves a half shard under the final name
    final = out / "zarr" / f"shard-{shard:05d}.zarr"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    chunks: dict[str, bytes] = {}
    dtypes = zarr_store.write_shard(tmp, csr, obs, var, codec=codec, x_dtype=x_dtype, chunks=chunks)
    fsync_tree(tmp)  # on disk before its done-record and the manifest say it is there
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return mf.shard_sha256(final, known=chunks), dtypes
