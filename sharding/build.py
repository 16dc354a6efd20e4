"""Build a corpus: sources -> globally shuffled Zarr shards and/or a SOMA experiment + manifest.

Two passes, memory bounded by a block, the spool budget and one shard:

pass 1  stream every source in row blocks; validate, align to the vocabulary, drop
        cells below --min-genes; give each kept cell a global ``cell_id`` (consecutive
        in source order) and deal it to a random shard; append it to that shard's spool.
pass 2  per shard: load its spool, shuffle its rows, write the Zarr shard and/or its
        rows of the SOMA experiment (soma_joinid = global position, shard by shard).

Dealing is sampling without replacement from fixed shard capacities, i.e. a uniformly
random assignment of cells to the slots of a global permutation, done per block with
O(shards) state. A crashed build resumes: pass 1 is redone unless it completed, and
shards already written (a marker in DIR/.build/done) are not redone. The manifest is
written last, so a failed build publishes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from scpretrain.scmodels.atomic import fsync_dir, fsync_tree
from scpretrain.sharding import manifest as mf
from scpretrain.sharding import zarr_store
from scpretrain.sharding.assemble import CATEGORICAL_MAX, COUNTED, assemble_manifest
from scpretrain.sharding.errors import InputError
from scpretrain.sharding.obs import FIXED_COLUMNS, ObsPlan, plan_obs
from scpretrain.sharding.readahead import read_ahead
from scpretrain.sharding.sources import CensusOptions, Source, open_sources
from scpretrain.sharding.spool import Categories, ShardSpool
from scpretrain.sharding.validate import (
    ValueFaults,
    check_unique,
    genes_per_cell,
    parse_holdout,
    parse_matrix,
)
from scpretrain.sharding.vocab import Alignment, Vocab, align, check_coverage, derive_vocab

FORMATS = ("zarr", "soma", "both")
READ_AHEAD = 2  # source blocks prepared ahead of dealing, in a thread (0: inline)
AUTO_JOBS_MIN_CELLS = 100_000  # below this, --jobs 0 (auto) writes shards in the main process
_OWNED = {"manifest.json", mf.MANIFEST_TMP, "vocab.tsv", "zarr", "soma", ".build"}


@dataclass
class BuildConfig:
    """Everything that decides a corpus; all but out, overwrite, progress and jobs enter the resume
    fingerprint."""

    sources: list[str]
    out: Path
    vocab: Path | None = None
    format: str = "zarr"
    cells_per_shard: int = 16_384
    keep_obs: list[str] = field(default_factory=list)
    label_key: str | None = None
    dataset_key: str | None = None
    matrix: str | None = None
    min_genes: int = 1
    holdout: str | None = None
    codec: str = "blosc-lz4"
    x_dtype: str = "auto"
    seed: int = 0
    min_coverage: float = 0.5
    allow_non_integer: bool = False
    jobs: int = 1  # pass-2 worker processes; 0: auto (see pass2_jobs)
    census_uri: str | None = None
    census_version: str | None = None
    census_filter: str | None = None
    block_rows: int = 8192
    spool_bytes: int = 256 << 20
    overwrite: bool = False
    progress: bool | None = None  # None: tqdm decides (shown on a terminal)


@dataclass
class _Plan:
    source: Source
    alignment: Alignment
    obs: ObsPlan


def build(cfg: BuildConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the corpus at ``cfg.out`` and return its manifest. Raises InputError on bad input."""
    _check_config(cfg)
    out = Path(cfg.out)
    _prepare_out(out, cfg.overwrite)
    vocab_in = Vocab.from_pairs(mf.read_vocab(cfg.vocab)) if cfg.vocab else None
    census = CensusOptions(uri=cfg.census_uri, version=cfg.census_version, filter=cfg.census_filter)
    sources = open_sources(cfg.sources, matrix=cfg.matrix, vocab=vocab_in, census=census)
    try:
        for s in sources:
            for note in s.notes:
                log(note)
        vocab = vocab_in or derive_vocab([s.genes for s in sources])
        plans = [_plan_source(s, vocab, cfg, log) for s in sources]
        string_cols = FIXED_COLUMNS[1:] + _keep_columns(cfg)
        build_dir = out / ".build"
        fingerprint = _fingerprint(cfg, sources, vocab)
        state = _load_state(build_dir, fingerprint)
        if state is None:
            if (build_dir / "pass1.json").exists():
                log(f"{out}: an unfinished earlier build had other inputs or options; starting over")
            _wipe(out, ("zarr", "soma", ".build"))
            try:
                state = _pass1(plans, cfg, vocab, string_cols, build_dir, fingerprint)
            except InputError:
                shutil.rmtree(build_dir, ignore_errors=True)  # a partial spool is useless
                raise
        else:
            log(f"{out}: resuming: pass 1 complete, {len(_done_shards(build_dir))} shards already written")
        shards = _pass2(state, cfg, vocab, string_cols, out)
    finally:
        for s in sources:
            s.close()
    manifest = assemble_manifest(state, shards, cfg, vocab, string_cols)
    mf.write_vocab(out / mf.VOCAB, vocab.pairs())
    mf.write_manifest(out, manifest)
    shutil.rmtree(out / ".build", ignore_errors=True)
    _print_summary(out, manifest, log)
    return manifest


def _check_config(cfg: BuildConfig) -> None:
    if not cfg.sources:
        raise InputError("no --source given; pass --source PATH.h5ad or --source synthetic://cells=1000")
    if cfg.format not in FORMATS:
        raise InputError(f"--format {cfg.format!r}: expected one of {', '.join(FORMATS)}")
    if cfg.cells_per_shard < 1 or cfg.min_genes < 0 or cfg.block_rows < 1 or cfg.jobs < 0:
        raise InputError("--cells-per-shard must be >= 1, --min-genes >= 0 and --jobs >= 0")
    if not 0.0 <= cfg.min_coverage <= 1.0:
        raise InputError(f"--min-coverage {cfg.min_coverage}: must be between 0 and 1")
    zarr_store.make_codec(cfg.codec)
    zarr_store.check_x_dtype(cfg.x_dtype)
    parse_matrix(cfg.matrix)
    parse_holdout(cfg.holdout)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if (out / mf.MANIFEST).exists():
        if not overwrite:
            raise InputError(f"{out}: already holds a complete corpus (manifest.json); "
                             "pass --overwrite to rebuild it or choose another --out")
        (out / mf.MANIFEST).unlink()  # unpublish first: a failed rebuild must not leave a stale corpus
        _wipe(out, tuple(_OWNED))
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWNED)
        if foreign:
            raise InputError(f"{out}: is not empty and not a corpus (holds {', '.join(foreign[:3])}); "
                             "choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)


def _wipe(out: Path, names: tuple[str, ...]) -> None:
    for name in names:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _keep_columns(cfg: BuildConfig) -> list[str]:
    return [c for c in dict.fromkeys(cfg.keep_obs) if c not in FIXED_COLUMNS]


def _plan_source(source: Source, vocab: Vocab, cfg: BuildConfig, log: Callable[[str], None]) -> _Plan:
    """Every metadata check, before a single row is read or written."""
    where = source.spec
    check_unique(source.genes.names, file=where, field="var", fix="gene ids must be unique "
                 "(drop or rename the duplicated genes, e.g. var_names_make_unique(), and re-save)")
    cell_ids = source.cell_ids()
    if cell_ids is not None:
        check_unique(cell_ids, file=where, field="obs", fix="cell ids must be unique within a file "
                     "(obs_names_make_unique() and re-save)")
    alignment = align(source.genes, vocab)
    log(f"{where}: {alignment.describe()}")
    check_coverage(alignment, file=where, min_coverage=cfg.min_coverage)
    obs = plan_obs(source, keep=_keep_columns(cfg), label_key=cfg.label_key,
                   dataset_key=cfg.dataset_key, holdout=parse_holdout(cfg.holdout, cfg.seed))
    for note in obs.notes:
        log(note)
    return _Plan(source, alignment, obs)


def _fingerprint(cfg: BuildConfig, sources: list[Source], vocab: Vocab) -> str:
    # jobs only changes how fast the same shards are written
    decided = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite", "progress", "jobs")}
    decided["vocab"] = mf.vocab_sha256(vocab.gene_ids)
    decided["sources"] = [s.fingerprint() for s in sources]
    return hashlib.sha256(json.dumps(decided, sort_keys=True, default=str).encode()).hexdigest()


def _load_state(build_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    path = build_dir / "pass1.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return state if state.get("fingerprint") == fingerprint else None


class _Dealer:
    """Deals cells to shards as draws without replacement from fixed capacities (see module doc)."""

    def __init__(self, n_cells: int, cells_per_shard: int, seed: int):
        self.n_shards = max(1, math.ceil(n_cells / cells_per_shard))
        base, extra = divmod(n_cells, self.n_shards)
        self.remaining = np.full(self.n_shards, base, dtype=np.int64)
        self.remaining[:extra] += 1
        self.rng = np.random.default_rng([seed, 1])

    def deal(self, n: int) -> np.ndarray:
        counts = self.rng.multivariate_hypergeometric(self.remaining, n)
        self.remaining -= counts
        dest = np.repeat(np.arange(self.n_shards), counts)
        self.rng.shuffle(dest)
        return dest


def _pass1(plans: list[_Plan], cfg: BuildConfig, vocab: Vocab, string_cols: list[str],
           build_dir: Path, fingerprint: str) -> dict[str, Any]:
    n_in = sum(p.source.n_cells for p in plans)
    dealer = _Dealer(n_in, cfg.cells_per_shard, cfg.seed)
    spool = ShardSpool(build_dir / "spool", dealer.n_shards, len(vocab), len(string_cols), cfg.spool_bytes)
    cats = {c: Categories() for c in string_cols}
    sizes = np.zeros(dealer.n_shards, dtype=np.int64)
    nnz = np.zeros(dealer.n_shards, dtype=np.int64)
    next_id, stats = 0, []
    bar = tqdm(total=n_in, unit="cells", desc="pass 1 (read, validate, deal)", disable=_no_bar(cfg))
    for plan in plans:
        kept, dropped, faults = 0, 0, ValueFaults()
        for block in read_ahead(_prepared(plan, cfg), depth=READ_AHEAD):
            bar.update(block.n_in)
            faults.merge(block.faults)
            if not faults.is_clean(cfg.allow_non_integer) or block.counts is None:
                continue  # keep reading only to count every bad value for the message
            counts, keep = block.counts, block.keep
            n_keep = counts.shape[0]
            dropped += block.n_in - n_keep
            codes = np.stack([cats[c].encode(block.columns[c][keep]) for c in string_cols], axis=1)
            cell_ids = np.arange(next_id, next_id + n_keep, dtype=np.int64)
            dest = dealer.deal(n_keep)
            spool.add(dest, counts, cell_ids, codes)
            sizes += np.bincount(dest, minlength=dealer.n_shards)
            row_nnz = np.diff(counts.indptr)
            nnz += np.bincount(dest, weights=row_nnz, minlength=dealer.n_shards).astype(np.int64)
            next_id, kept = next_id + n_keep, kept + n_keep
        faults.raise_if_bad(file=plan.source.spec, matrix=plan.source.matrix,
                            allow_non_integer=cfg.allow_non_integer)
        stats.append(_source_stats(plan, kept, dropped))
    bar.close()
    spool.flush()
    if next_id == 0:
        raise InputError(f"{', '.join(cfg.sources)}: no cells left after dropping cells with fewer than "
                         f"{cfg.min_genes} expressed vocabulary genes; lower --min-genes or check the "
                         "vocabulary")
    state = {"fingerprint": fingerprint, "n_cells": next_id, "n_shards": dealer.n_shards,
             "shard_sizes": sizes.tolist(), "shard_nnz": nnz.tolist(),
             "categories": {c: cats[c].values for c in string_cols}, "sources": stats,
             "holdout_values": sorted(set().union(*(p.obs.held_out for p in plans)))}
    mf.write_atomic(build_dir / "pass1.json", json.dumps(state).encode())
    return state


@dataclass
class _Prepared:
    """One source block, validated, cast, aligned to the vocabulary and filtered by --min-genes."""

    n_in: int
    faults: ValueFaults
    counts: Any = None  # CSR float32 over the vocabulary, kept cells only (None once faults are seen)
    keep: np.ndarray | None = None
    columns: dict[str, np.ndarray] | None = None


def _prepared(plan: _Plan, cfg: BuildConfig) -> Iterator[_Prepared]:
    """The per-block work that needs no build state, so it can run ahead of dealing and spooling."""
    clean = ValueFaults()
    for block in plan.source.blocks(cfg.block_rows, plan.obs.read_columns):
        faults = ValueFaults()
        faults.add(block.counts.data)
        clean.merge(faults)
        n = block.counts.shape[0]
        if not clean.is_clean(cfg.allow_non_integer):
            yield _Prepared(n, faults)  # only counting bad values from here on
            continue
        counts = block.counts.astype(np.float32)
        counts.eliminate_zeros()
        counts = plan.alignment.apply(counts)
        keep = genes_per_cell(counts) >= cfg.min_genes
        yield _Prepared(n, faults, counts[keep], keep, plan.obs.derive(block.obs, n))


def _source_stats(plan: _Plan, kept: int, dropped: int) -> dict[str, Any]:
    src = plan.source
    facts = {k: mf.redact(v) if isinstance(v, str) else v for k, v in src.provenance().items()}
    return {"spec": mf.redact(src.spec), "kind": src.kind, "sha256": src.sha256(), **facts,
            "n_cells_in": src.n_cells, "n_cells_kept": kept, "n_dropped_min_genes": dropped,
            "matrix": src.matrix, "gene_coverage": round(plan.alignment.gene_coverage, 6),
            "vocab_coverage": round(plan.alignment.vocab_coverage, 6),
            "matched_by": plan.alignment.matched_by}


def _done_shards(build_dir: Path) -> dict[int, dict[str, Any]]:
    done = {}
    for p in sorted((build_dir / "done").glob("shard-*.json")):
        done[int(p.stem.split("-")[1])] = json.loads(p.read_text())
    return done


@dataclass
class _Pass2:
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


_WORKER: _Pass2 | None = None  # set in each pass-2 worker process by _init_worker


def _pass2(state: dict[str, Any], cfg: BuildConfig, vocab: Vocab, string_cols: list[str],
           out: Path) -> list[dict[str, Any]]:
    build_dir = out / ".build"
    (build_dir / "done").mkdir(parents=True, exist_ok=True)
    n_shards = state["n_shards"]
    job = _Pass2(out=out, seed=cfg.seed, codec=cfg.codec, x_dtype=cfg.x_dtype, format=cfg.format,
                 n_shards=n_shards,
                 n_genes=len(vocab), spool_bytes=cfg.spool_bytes, string_cols=string_cols,
                 categories=state["categories"],
                 var=pd.DataFrame({"symbol": vocab.symbols}, index=pd.Index(vocab.gene_ids, name=None)),
                 offsets=np.concatenate([[0], np.cumsum(state["shard_sizes"])]).astype(np.int64),
                 soma_resumed=cfg.format != "zarr" and _soma_ready(build_dir, out / "soma", state, vocab,
                                                                   string_cols))
    if cfg.format != "soma":
        (out / "zarr").mkdir(exist_ok=True)
    todo = [s for s in range(n_shards) if s not in _done_shards(build_dir)]
    bar = tqdm(total=n_shards, initial=n_shards - len(todo), desc="pass 2 (shuffle, write shards)",
               unit="shard", disable=_no_bar(cfg))
    jobs = pass2_jobs(cfg.jobs, state["n_cells"], len(todo))
    if jobs == 1:
        for shard in todo:
            _write_shard(job, shard)
            bar.update()
    else:
        # processes, not threads: encoding and the numpy/pandas work of a shard hold the GIL;
        # spawned so no TileDB or HDF5 state is inherited. Memory: one shard per worker.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(job,)) as pool:
            for future in as_completed([pool.submit(_write_shard_in_worker, s) for s in todo]):
                future.result()
                bar.update()
    bar.close()
    done = _done_shards(build_dir)
    return [done[s] for s in range(n_shards)]


def pass2_jobs(jobs: int, n_cells: int, n_todo: int) -> int:
    """Worker processes for pass 2: ``jobs``, or for 0 (auto) one per core up to 4 when the corpus is big
    enough to repay starting them (a spawned worker costs 1-2 s of imports). Not the default: on the
    2-core development machine, shared with other work, two workers were slower than one (no idle core,
    plus the imports); `benchmarks/bench_corpus.py` measures both on a quiet machine."""
    if jobs == 0:
        jobs = min(4, os.cpu_count() or 1) if n_cells >= AUTO_JOBS_MIN_CELLS else 1
    return max(1, min(jobs, n_todo))


def _init_worker(job: _Pass2) -> None:
    global _WORKER
    _WORKER = job


def _write_shard_in_worker(shard: int) -> None:
    assert _WORKER is not None
    _write_shard(_WORKER, shard)


def _write_shard(job: _Pass2, shard: int) -> None:
    """Shuffle one shard's spooled rows, write its Zarr store and/or SOMA rows, then mark it done."""
    build_dir = job.out / ".build"
    spool = ShardSpool(build_dir / "spool", job.n_shards, job.n_genes, len(job.string_cols), job.spool_bytes)
    csr, cell_ids, codes = spool.read(shard)
    perm = np.random.default_rng([job.seed, 2, shard]).permutation(csr.shape[0])
    csr, cell_ids, codes = csr[perm], cell_ids[perm], codes[perm]
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
        record["sha256"], record["dtypes"] = _write_zarr_shard(job.out, shard, csr, obs, job.var, job.codec,
                                                               job.x_dtype)
    if job.format != "zarr":
        from scpretrain.sharding import soma_store  # only SOMA builds import tiledbsoma

        soma_store.write_rows(job.out / "soma", int(job.offsets[shard]), csr, obs, replace=job.soma_resumed)
    mf.write_atomic(build_dir / "done" / f"shard-{shard:05d}.json", json.dumps(record).encode())
    spool.remove(shard)


def _soma_ready(build_dir: Path, uri: Path, state: dict[str, Any], vocab: Vocab,
                string_cols: list[str]) -> bool:
    """Create the experiment unless a previous run did; True when rows may already exist (resume)."""
    marker = build_dir / "soma.created"
    if marker.exists() and uri.exists():
        return True
    shutil.rmtree(uri, ignore_errors=True)  # half-created by a crash: start it again
    from scpretrain.sharding import soma_store

    soma_store.create_experiment(uri, n_cells=state["n_cells"], genes=vocab.pairs(),
                                 obs_columns=["cell_id"] + string_cols)
    marker.touch()
    return False


def _write_zarr_shard(out: Path, shard: int, csr: Any, obs: pd.DataFrame, var: pd.DataFrame,
                      codec: str, x_dtype: str) -> tuple[str, dict[str, str]]:
    # write beside the final name and rename: a crash never leaves a half shard under the final name
    final = out / "zarr" / f"shard-{shard:05d}.zarr"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dtypes = zarr_store.write_shard(tmp, csr, obs, var, codec=codec, x_dtype=x_dtype)
    fsync_tree(tmp)  # on disk before its done-record and the manifest say it is there
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return mf.shard_sha256(final), dtypes


def _no_bar(cfg: BuildConfig) -> bool | None:
    return None if cfg.progress is None else not cfg.progress


def _print_summary(out: Path, manifest: dict[str, Any], log: Callable[[str], None]) -> None:
    from scpretrain.sharding.check import summarize  # the same summary `inspect` prints

    log(summarize(out, manifest))
