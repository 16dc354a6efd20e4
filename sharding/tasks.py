"""A corpus build as independent tasks: the same corpus from one process or from many (a SLURM array, a
process pool). ``build`` runs them all in one process; ``python -m sharding build --plan/--task/--finish``
runs them apart.

plan     check every source's metadata, choose the vocabulary, cut the input rows into phase-1 tasks at
         block boundaries; DIR/.build/plan.json and DIR/.build/vocab.tsv
phase 1  task i: read its row ranges; validate, align, drop cells below --min-genes; deal every input row
         to a shard; spool the kept rows into DIR/.build/p1-i/; record sizes, categories and dropped rows
         in DIR/.build/p1-i.json (written last: a task either finished or is redone)
phase 2  task j: merge the phase-1 records, then for every shard s with s % tasks == j: read its rows from
         each phase-1 spool in task order, shuffle, write (``sharding.shards``), mark it done
finish   check that every task is done; assemble and publish the manifest atomically

Dealing depends on (seed, block index) alone: block g (``block_rows`` rows of one source, in source order)
draws its shard counts from the capacities the blocks before it left, with ``rng([seed, 1, g])``, and
shuffles them with the same generator. A task starting at block g replays the counts of blocks 0..g-1
(O(shards) each) and then deals exactly as one process does. A kept cell's ``cell_id`` is its position
among all kept rows, known in phase 2 from every task's dropped rows. So a build with one task and one with
N write the same cells to the same shards in the same order: identical shards and checksums.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from scpretrain.sharding import manifest as mf
from scpretrain.sharding.assemble import assemble_manifest
from scpretrain.sharding.config import BuildConfig, config_from_dict, config_to_dict, keep_columns
from scpretrain.sharding.errors import InputError
from scpretrain.sharding.obs import FIXED_COLUMNS
from scpretrain.sharding.readahead import read_ahead
from scpretrain.sharding.reading import fingerprint, plan_source, prepared, source_stats
from scpretrain.sharding.shards import (
    ShardJob,
    done_shards,
    init_worker,
    pass2_jobs,
    shuffled_rows,
    soma_ready,
    write_shard,
    write_shard_in_worker,
)
from scpretrain.sharding.sources import CensusOptions, Source, open_sources
from scpretrain.sharding.spool import SPOOL_FORMAT, Categories, ShardSpool
from scpretrain.sharding.validate import ValueFaults
from scpretrain.sharding.vocab import Vocab, derive_vocab

PLAN = "plan.json"
READ_AHEAD = 2  # source blocks prepared ahead of dealing, in a thread (0: inline)
Log = Callable[[str], None]


def open_all(cfg: BuildConfig, vocab: Vocab | None = None) -> list[Source]:
    census = CensusOptions(uri=cfg.census_uri, version=cfg.census_version, filter=cfg.census_filter)
    return open_sources(cfg.sources, matrix=cfg.matrix, vocab=vocab, census=census)


def string_columns(cfg: BuildConfig) -> list[str]:
    return FIXED_COLUMNS[1:] + keep_columns(cfg)


def input_blocks(n_cells: list[int], block_rows: int) -> list[tuple[int, int, int]]:
    """(source, start, stop) of every input block, in source order: the unit of dealing."""
    return [(k, s, min(s + block_rows, n)) for k, n in enumerate(n_cells) for s in range(0, n, block_rows)]


def cut_tasks(n_cells: list[int], block_rows: int, tasks: int) -> list[list[int]]:
    """Block indices of each phase-1 task: contiguous runs of about equal rows (a task may be empty)."""
    blocks = input_blocks(n_cells, block_rows)
    rows = np.cumsum([b[2] - b[1] for b in blocks]) if blocks else np.zeros(0)
    total = rows[-1] if len(rows) else 0
    owner = np.minimum((np.concatenate([[0], rows[:-1]]) * tasks) // max(total, 1), tasks - 1).astype(int)
    return [np.flatnonzero(owner == t).tolist() for t in range(tasks)]


class Dealer:
    """Deals input rows to shards: draws without replacement from fixed shard capacities (a uniformly random
    assignment of rows to the slots of a global permutation), block by block, each block from its own
    generator (see the module docstring)."""

    def __init__(self, n_cells: int, cells_per_shard: int, seed: int):
        self.n_shards = max(1, math.ceil(n_cells / cells_per_shard))
        base, extra = divmod(n_cells, self.n_shards)
        self.remaining = np.full(self.n_shards, base, dtype=np.int64)
        self.remaining[:extra] += 1
        self.seed = seed

    def _counts(self, block: int, n: int) -> tuple[np.ndarray, np.random.Generator]:
        rng = np.random.default_rng([self.seed, 1, block])
        counts = rng.multivariate_hypergeometric(self.remaining, n)
        self.remaining -= counts
        return counts, rng

    def skip(self, block: int, n: int) -> None:
        """Account for a block another task deals."""
        self._counts(block, n)

    def deal(self, block: int, n: int) -> np.ndarray:
        counts, rng = self._counts(block, n)
        dest = np.repeat(np.arange(self.n_shards), counts)
        rng.shuffle(dest)
        return dest


# --- plan -----------------------------------------------------------------------------------------------

def make_plan(cfg: BuildConfig, tasks: int, log: Log) -> dict[str, Any]:
    """Check the sources' metadata and write DIR/.build/plan.json (kept when an identical plan exists, so an
    interrupted build resumes); returns the plan. ``tasks`` 0: one per core (at most 4) from 100k cells."""
    if tasks < 0:
        raise InputError(f"--tasks {tasks}: must be >= 1 (0: one per core, at most 4, from 100k cells)")
    build_dir = Path(cfg.out) / ".build"
    vocab_in = Vocab.from_pairs(mf.read_vocab(cfg.vocab)) if cfg.vocab else None
    sources = open_all(cfg, vocab_in)
    try:
        for s in sources:
            for note in s.notes:
                log(note)
        vocab = vocab_in or derive_vocab([s.genes for s in sources])
        for s in sources:
            plan_source(s, vocab, cfg, log)
        n_cells = [s.n_cells for s in sources]
        if tasks == 0:
            tasks = pass2_jobs(0, sum(n_cells), len(input_blocks(n_cells, cfg.block_rows)))
        key = _plan_key(cfg, sources, vocab, tasks)
        files = [str(f) for s in sources for f in s.files()]
    finally:
        for s in sources:
            s.close()
    old = read_plan(cfg.out, missing_ok=True)
    if old is not None and old["fingerprint"] == key:
        return old
    if old is not None or build_dir.exists():
        log(f"{cfg.out}: an unfinished earlier build had other inputs or options; starting over")
    for name in ("zarr", "soma", ".build"):
        shutil.rmtree(Path(cfg.out) / name, ignore_errors=True)
    build_dir.mkdir(parents=True)
    mf.write_vocab(build_dir / "vocab.tsv", vocab.pairs())
    n_in = sum(n_cells)
    plan = {"fingerprint": key, "config": config_to_dict(cfg), "n_cells_in": n_cells, "n_in": n_in, "files": files,
            "n_shards": max(1, math.ceil(n_in / cfg.cells_per_shard)), "tasks": tasks,
            "phase1_blocks": cut_tasks(n_cells, cfg.block_rows, tasks)}
    mf.write_atomic(build_dir / PLAN, json.dumps(plan).encode())
    return plan


def read_plan(out: Path | str, missing_ok: bool = False) -> dict[str, Any] | None:
    path = Path(out) / ".build" / PLAN
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        if missing_ok:
            return None
        raise InputError(f"{path}: no build plan; run `python -m sharding build --source ... --out {out} --plan "
                         "--tasks N` first") from None


def _plan_key(cfg: BuildConfig, sources: list[Source], vocab: Vocab, tasks: int) -> str:
    """What a plan is valid for: the inputs and options, the task count and the spool's file format."""
    return f"{fingerprint(cfg, sources, vocab)}/tasks={tasks}/spool={SPOOL_FORMAT}"


def check_unchanged(plan: dict[str, Any], cfg: BuildConfig, sources: list[Source], vocab: Vocab) -> None:
    """A task reads the inputs the plan checked: same files (size, mtime), options and vocabulary."""
    if _plan_key(cfg, sources, vocab, plan["tasks"]) != plan["fingerprint"]:
        raise InputError(f"{cfg.out}: the sources changed since --plan (a file's size or time differs); run "
                         "--plan again (with --overwrite if a corpus was published)")


def _task_path(build_dir: Path, task: int) -> Path:
    return build_dir / f"p1-{task:05d}.json"


# --- phase 1 --------------------------------------------------------------------------------------------

# long: one read-validate-deal loop over the task's blocks, with the checks that make the task redoable
def run_phase1(out: Path, task: int, log: Log) -> dict[str, Any]:
    """Phase-1 task ``task``: deal and spool its row ranges; returns its record (kept when already done)."""
    plan = read_plan(out)
    cfg = config_from_dict(plan["config"])
    if not 0 <= task < plan["tasks"]:
        raise InputError(f"--task {task}: the plan has tasks 0-{plan['tasks'] - 1}")
    build_dir = Path(out) / ".build"
    record_path = _task_path(build_dir, task)
    if record_path.exists():
        return json.loads(record_path.read_text())
    spool_dir = build_dir / f"p1-{task:05d}"
    shutil.rmtree(spool_dir, ignore_errors=True)
    vocab = Vocab.from_pairs(mf.read_vocab(build_dir / "vocab.tsv"))
    cols = string_columns(cfg)
    blocks = input_blocks(plan["n_cells_in"], cfg.block_rows)
    mine = plan["phase1_blocks"][task]
    dealer = Dealer(plan["n_in"], cfg.cells_per_shard, cfg.seed)
    for g in range(mine[0] if mine else 0):
        dealer.skip(g, blocks[g][2] - blocks[g][1])
    spool = ShardSpool(spool_dir, dealer.n_shards, len(vocab), len(cols), cfg.spool_bytes)
    cats = {c: Categories() for c in cols}
    sizes = np.zeros(dealer.n_shards, dtype=np.int64)
    nnz = np.zeros(dealer.n_shards, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(plan["n_cells_in"])]).astype(np.int64)
    dropped: list[np.ndarray] = []
    per_source: dict[int, list[int]] = {}
    held_out: set[str] = set()
    sources = open_all(cfg, vocab)
    try:
        check_unchanged(plan, cfg, sources, vocab)
    except BaseException:
        for s in sources:
            s.close()
        raise
    n_rows = sum(blocks[g][2] - blocks[g][1] for g in mine)
    bar = tqdm(total=n_rows, unit="cells", desc=f"phase 1 task {task} (read, validate, deal)",
               disable=None if cfg.progress is None else not cfg.progress)
    try:
        for k in sorted({blocks[g][0] for g in mine}):
            mine_k = [g for g in mine if blocks[g][0] == k]
            splan = plan_source(sources[k], vocab, cfg, lambda _m: None)
            start, stop = blocks[mine_k[0]][1], blocks[mine_k[-1]][2]
            faults, kept_n, dropped_n, rows_seen = ValueFaults(), 0, 0, 0
            for g, block in zip(mine_k, read_ahead(prepared(splan, cfg, start, stop), depth=READ_AHEAD)):
                bar.update(block.n_in)
                rows_seen += block.n_in
                dest = dealer.deal(g, block.n_in)
                faults.merge(block.faults)
                if not faults.is_clean(cfg.allow_non_integer) or block.counts is None:
                    continue  # keep reading only to count every bad value for the message
                rows = offsets[k] + blocks[g][1] + np.arange(block.n_in, dtype=np.int64)
                keep = block.keep
                dropped.append(rows[~keep])
                codes = np.stack([cats[c].encode(block.columns[c][keep]) for c in cols], axis=1)
                spool.add(dest[keep], block.counts, rows[keep], codes)
                sizes += np.bincount(dest[keep], minlength=dealer.n_shards)
                nnz += np.bincount(dest[keep], weights=np.diff(block.counts.indptr),
                                   minlength=dealer.n_shards).astype(np.int64)
                kept_n += int(keep.sum())
                dropped_n += int((~keep).sum())
            if rows_seen != stop - start:
                raise InputError(f"{splan.source.spec}: {rows_seen} of rows {start}-{stop} could be read; the "
                                 "source changed since --plan (run --plan again)")
            faults.raise_if_bad(file=splan.source.spec, matrix=splan.source.matrix,
                                allow_non_integer=cfg.allow_non_integer)
            per_source[k] = [kept_n, dropped_n]
            held_out |= splan.obs.held_out
        spool.flush()
    except BaseException:
        shutil.rmtree(spool_dir, ignore_errors=True)  # a partial spool is useless
        raise
    finally:
        bar.close()
        for s in sources:
            s.close()
    rows_dropped = np.concatenate(dropped) if dropped else np.zeros(0, np.int64)
    np.save(build_dir / f"p1-{task:05d}.dropped.npy", rows_dropped)
    record = {"task": task, "shard_sizes": sizes.tolist(), "shard_nnz": nnz.tolist(),
              "categories": {c: cats[c].values for c in cols}, "sources": {str(k): v for k, v in per_source.items()},
              "holdout_values": sorted(held_out)}
    mf.write_atomic(record_path, json.dumps(record).encode())
    return record


def _silent(_message: str) -> None:
    pass


def run_phase1_many(out: Path, task_ids: list[int], workers: int, log: Log) -> None:
    """Phase-1 tasks ``task_ids``, ``workers`` processes at a time (spawned: no HDF5 or TileDB state is
    inherited; each opens the sources it reads)."""
    if workers <= 1 or len(task_ids) <= 1:
        for t in task_ids:
            run_phase1(out, t, log)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(task_ids)), mp_context=ctx) as pool:
        for future in as_completed([pool.submit(run_phase1, Path(out), t, _silent) for t in task_ids]):
            future.result()


# --- between the phases: the merged state ---------------------------------------------------------------

def merged_state(out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Every phase-1 record merged: categories in first-seen order, each task's code remap, shard sizes,
    the dropped rows. Refused, naming the task and the command, when one has not finished."""
    build_dir = Path(out) / ".build"
    cols = string_columns(config_from_dict(plan["config"]))
    missing = [t for t in range(plan["tasks"]) if not _task_path(build_dir, t).exists()]
    if missing:
        raise InputError(f"{out}: phase-1 task(s) {', '.join(map(str, missing[:10]))} of {plan['tasks']} have not "
                         f"finished (no {_task_path(build_dir, missing[0]).name}); run `python -m sharding build "
                         f"--out {out} --task {missing[0]} --phase 1` first")
    cats = {c: Categories() for c in cols}
    remaps, sizes, nnz, dropped, per_source, held = [], 0, 0, [], {}, set()
    for t in range(plan["tasks"]):
        rec = json.loads(_task_path(build_dir, t).read_text())
        remaps.append({c: cats[c].encode(pd.Series(rec["categories"][c], dtype=object)).astype(np.int32)
                       for c in cols})
        sizes = sizes + np.asarray(rec["shard_sizes"], dtype=np.int64)
        nnz = nnz + np.asarray(rec["shard_nnz"], dtype=np.int64)
        dropped.append(np.load(build_dir / f"p1-{t:05d}.dropped.npy"))
        for k, (kept, drop) in rec["sources"].items():
            a, b = per_source.get(int(k), (0, 0))
            per_source[int(k)] = (a + kept, b + drop)
        held |= set(rec["holdout_values"])
    n_cells = int(np.sum(sizes))
    return {"n_cells": n_cells, "n_shards": plan["n_shards"], "shard_sizes": np.asarray(sizes).tolist(),
            "shard_nnz": np.asarray(nnz).tolist(), "categories": {c: cats[c].values for c in cols},
            "holdout_values": sorted(held), "remaps": remaps, "per_source": per_source,
            "dropped": np.sort(np.concatenate(dropped)) if dropped else np.zeros(0, np.int64)}


# --- phase 2 --------------------------------------------------------------------------------------------

def run_phase2(out: Path, task: int | None, log: Log, jobs: int = 1) -> None:
    """Write the shards of phase-2 task ``task`` (None: every shard), ``jobs`` processes at a time."""
    plan = read_plan(out)
    cfg = config_from_dict(plan["config"])
    state = merged_state(out, plan)
    if state["n_cells"] == 0:
        raise InputError(f"{', '.join(cfg.sources)}: no cells left after dropping cells with fewer than "
                         f"{cfg.min_genes} expressed vocabulary genes; lower --min-genes or check the vocabulary")
    if task is not None and not 0 <= task < plan["tasks"]:
        raise InputError(f"--task {task}: the plan has tasks 0-{plan['tasks'] - 1}")
    build_dir = Path(out) / ".build"
    (build_dir / "done").mkdir(parents=True, exist_ok=True)
    vocab = Vocab.from_pairs(mf.read_vocab(build_dir / "vocab.tsv"))
    cols = string_columns(cfg)
    n_shards = state["n_shards"]
    job = ShardJob(out=Path(out), seed=cfg.seed, codec=cfg.codec, x_dtype=cfg.x_dtype, format=cfg.format,
                   n_shards=n_shards, n_genes=len(vocab), spool_bytes=cfg.spool_bytes, string_cols=cols,
                   categories=state["categories"],
                   var=pd.DataFrame({"symbol": vocab.symbols}, index=pd.Index(vocab.gene_ids, name=None)),
                   offsets=np.concatenate([[0], np.cumsum(state["shard_sizes"])]).astype(np.int64),
                   soma_resumed=cfg.format != "zarr" and soma_ready(build_dir, Path(out) / "soma", state["n_cells"],
                                                                   vocab, cols),
                   spools=[build_dir / f"p1-{t:05d}" for t in range(plan["tasks"])], remaps=state["remaps"],
                   dropped=state["dropped"])
    if cfg.format != "soma":
        (Path(out) / "zarr").mkdir(exist_ok=True)
    mine = [s for s in range(n_shards) if task is None or s % plan["tasks"] == task]
    done = done_shards(build_dir)
    todo = [s for s in mine if s not in done]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard",
               desc="phase 2 (shuffle, write shards)" if task is None else f"phase 2 task {task}",
               disable=None if cfg.progress is None else not cfg.progress)
    workers = pass2_jobs(jobs, state["n_cells"], len(todo))
    if workers == 1:
        # the next shard's rows are read back and shuffled in a thread while this one is written (numpy, scipy
        # and the codecs release the GIL): 5% off a 200k-cell Zarr build. Memory: two shards' rows.
        with ThreadPoolExecutor(1) as reader:
            ahead = reader.submit(shuffled_rows, job, todo[0]) if todo else None
            for i, shard in enumerate(todo):
                rows = ahead.result() if ahead is not None else None
                ahead = reader.submit(shuffled_rows, job, todo[i + 1]) if i + 1 < len(todo) else None
                write_shard(job, shard, rows)
                bar.update()
    else:
        # processes, not threads: encoding and the numpy/pandas work of a shard hold the GIL;
        # spawned so no TileDB or HDF5 state is inherited. Memory: one shard per worker.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(job,)) as pool:
            for future in as_completed([pool.submit(write_shard_in_worker, s) for s in todo]):
                future.result()
                bar.update()
    bar.close()


# --- finish ---------------------------------------------------------------------------------------------

def finish(out: Path, log: Log) -> dict[str, Any]:
    """Check every task is done, then publish the manifest (atomically) and remove DIR/.build."""
    plan = read_plan(out)
    cfg = config_from_dict({**plan["config"], "out": str(out)})
    state = merged_state(out, plan)
    build_dir = Path(out) / ".build"
    done = done_shards(build_dir)
    missing = [s for s in range(state["n_shards"]) if s not in done]
    if missing:
        t = missing[0] % plan["tasks"]
        raise InputError(f"{out}: {len(missing)} of {state['n_shards']} shards not written yet (e.g. shard "
                         f"{missing[0]}, phase-2 task {t}); run `python -m sharding build --out {out} --task {t} "
                         "--phase 2`, then --finish again")
    vocab = Vocab.from_pairs(mf.read_vocab(build_dir / "vocab.tsv"))
    sources = open_all(cfg, vocab)
    try:
        stats = []
        for k, s in enumerate(sources):
            kept, dropped = state["per_source"].get(k, (0, 0))
            stats.append(source_stats(plan_source(s, vocab, cfg, lambda _m: None), kept, dropped))
    finally:
        for s in sources:
            s.close()
    state["sources"] = stats
    cols = string_columns(cfg)
    manifest = assemble_manifest(state, [done[s] for s in range(state["n_shards"])], cfg, vocab, cols)
    mf.write_vocab(Path(out) / mf.VOCAB, vocab.pairs())
    mf.write_manifest(out, manifest)
    shutil.rmtree(build_dir, ignore_errors=True)
    return manifest
