"""Build a corpus: sources -> globally shuffled Zarr shards and/or a SOMA experiment + manifest.

Two phases, memory bounded by a block, the spool budget and one shard (``sharding.tasks`` runs them, in one
process here or as independent tasks: ``python -m sharding build --plan/--task/--finish``):

phase 1  stream every source in row blocks; validate, align to the vocabulary, drop
         cells below --min-genes; deal each input row to a random shard; append the kept
         rows to that shard's spool.
phase 2  per shard: load its spool, shuffle its rows, write the Zarr shard and/or its
         rows of the SOMA experiment (soma_joinid = global position, shard by shard);
         ``cell_id`` = the cell's position among the kept cells, in source order.

Dealing is sampling without replacement from fixed shard capacities, i.e. a uniformly
random assignment of cells to the slots of a global permutation, done per block with
O(shards) state. A crashed build resumes: phase 1 is redone unless it completed, and
shards already written (a marker in DIR/.build/done) are not redone. The manifest is
written last, so a failed build publishes nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scpretrain.sharding import manifest as mf
from scpretrain.sharding import (
    tasks,
    zarr_store,  # noqa: F401  (tests patch zarr_store.write_shard through here)
)
from scpretrain.sharding.config import FORMATS, BuildConfig, check_config
from scpretrain.sharding.errors import InputError
from scpretrain.sharding.shards import done_shards, pass2_jobs
from scpretrain.sharding.sources.base import hash_ahead

__all__ = ["FORMATS", "BuildConfig", "build", "finish_build", "pass2_jobs", "plan_build", "run_task"]
_OWNED = {"manifest.json", mf.MANIFEST_TMP, "vocab.tsv", "zarr", "soma", ".build"}


def build(cfg: BuildConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the corpus at ``cfg.out`` and return its manifest. Raises InputError on bad input."""
    check_config(cfg)
    out = Path(cfg.out)
    _prepare_out(out, cfg.overwrite)
    # --jobs N: phase 1 as N tasks (the corpus is the same for every N), phase 2 in N processes
    plan = tasks.make_plan(cfg, cfg.jobs, log)
    build_dir = out / ".build"
    todo = [t for t in range(plan["tasks"]) if not (build_dir / f"p1-{t:05d}.json").exists()]
    if not todo:
        log(f"{out}: resuming: phase 1 complete, {len(done_shards(build_dir))} shards already written")
    try:
        tasks.run_phase1_many(out, todo, plan["tasks"], log)
        hashing = hash_ahead(plan.get("files", []))  # the manifest's source sha256, beside phase 2
        tasks.run_phase2(out, None, log, jobs=cfg.jobs)
    except InputError:  # bad values, or no cell left: the spool is useless
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    hashing.join()
    manifest = tasks.finish(out, log)
    _print_summary(out, manifest, log)
    return manifest


def plan_build(cfg: BuildConfig, n_tasks: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``--plan --tasks N``: check the inputs and write the task list (DIR/.build/plan.json)."""
    check_config(cfg)
    if n_tasks < 1:
        raise InputError(f"--tasks {n_tasks}: must be >= 1")
    if n_tasks > 1 and cfg.format != "zarr":
        raise InputError(f"--tasks {n_tasks} with --format {cfg.format}: a build split into tasks writes Zarr "
                         "shards only (phase-2 tasks on many nodes cannot share the creation of one SOMA "
                         "experiment); build SOMA in one process (no --plan; --jobs N still runs phase 1 as N "
                         "tasks), or pass --format zarr")
    _prepare_out(Path(cfg.out), cfg.overwrite)
    plan = tasks.make_plan(cfg, n_tasks, log)
    log(f"{cfg.out}: planned {plan['tasks']} task(s) over {plan['n_in']:,} cells and {plan['n_shards']} shards; "
        f"run `python -m sharding build --out {cfg.out} --task I --phase 1` for I in 0-{plan['tasks'] - 1}, then "
        "the same with --phase 2, then --finish")
    return plan


def run_task(out: Path, task: int, phase: int, log: Callable[[str], None] = print, jobs: int = 1) -> None:
    """``--task I --phase 1|2``: one task of a planned build."""
    if phase == 1:
        tasks.run_phase1(out, task, log)
    elif phase == 2:
        tasks.run_phase2(out, task, log, jobs=jobs)
    else:
        raise InputError(f"--phase {phase}: expected 1 or 2")
    log(f"{out}: phase-{phase} task {task} done")


def finish_build(out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``--finish``: check every task, publish the manifest."""
    manifest = tasks.finish(out, log)
    _print_summary(out, manifest, log)
    return manifest


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


def _print_summary(out: Path, manifest: dict[str, Any], log: Callable[[str], None]) -> None:
    from scpretrain.sharding.check import summarize  # the same summary `inspect` prints

    log(summarize(out, manifest))
