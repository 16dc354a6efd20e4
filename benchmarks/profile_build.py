"""Where a corpus build's seconds go, stage by stage (issue 17; a profile, not a test).

Runs ``sharding.build.build`` in this process under cProfile, once per --format, on one input h5ad (the
compare input of ``benchmarks.bench_corpus``, generated and cached the same way), with the source read-ahead
thread switched off (READ_AHEAD = 0) and pass 2 in this process (--jobs 1): the figures are CPU seconds per
stage on the main thread. Phase 2's read-back of the next shard, chunk-file writes, fsyncs and the sources'
sha256 run in helper threads and are not in that table (``--phases`` counts them); the wall time of the real
build is measured by ``bench_corpus``.

    python -m benchmarks.profile_build --cells 200000                 # the issue's input (~2.4 GB h5ad)
    python -m benchmarks.profile_build --cells 50000 --formats zarr    # a quicker look
    python -m benchmarks.profile_build --phases --cells 200000          # wall and CPU per phase, as built

--phases runs the real build (read-ahead and phase-2 threads on, restarted with the huge-page tunable as
``python -m sharding build`` is) and prints, per phase, wall seconds, the process's user and system CPU
seconds and its minor page faults: the cProfile table sees the main thread only, and the build now works in
helper threads too (read-ahead, the next shard's rows, chunk files, fsync, the sources' sha256).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_corpus import REPO, write_input_h5ad

# stage -> the functions whose cumulative time is that stage (module path fragment, function name)
STAGES = {
    "read h5ad blocks (h5py, CSR slices)": [("sources/h5ad.py", "blocks")],
    "validate values (integers, NaN, negatives)": [("validate.py", "add")],
    "align to the vocabulary": [("vocab.py", "apply")],
    "min-genes filter": [("validate.py", "genes_per_cell")],
    "obs columns (derive, encode)": [("obs.py", "derive"), ("spool.py", "encode")],
    "deal cells to shards": [("tasks.py", "deal")],
    "spool write (pass 1)": [("spool.py", "add"), ("spool.py", "flush")],
    "spool read (pass 2)": [("spool.py", "read")],
    "Zarr encode + write": [("zarr_store.py", "write_shard")],
    "fsync shards": [("atomic.py", "fsync_tree")],
    "checksums (sha256 of every chunk)": [("manifest.py", "shard_sha256")],
    "SOMA write (tiledbsoma)": [("soma_store.py", "write_rows"), ("soma_store.py", "create_experiment")],
    "manifest + summary (incl. the sources' sha256)": [("tasks.py", "finish"), ("build.py", "_print_summary")],
}


def stage_seconds(stats: pstats.Stats) -> dict[str, float]:
    raw = stats.stats  # type: ignore[attr-defined]
    out = {}
    for stage, funcs in STAGES.items():
        total = 0.0
        for (file, _line, name), (_cc, _nc, _tt, ct, _callers) in raw.items():
            if any(file.endswith(frag) and name == fn for frag, fn in funcs):
                total += ct
        out[stage] = total
    return out


def profile_one(src: Path, fmt: str, work: Path) -> tuple[float, dict[str, float], pstats.Stats]:
    from scpretrain.sharding import build as build_mod
    from scpretrain.sharding import tasks

    tasks.READ_AHEAD = 0  # sharding.tasks runs the phases
    out = work / f"corpus_{fmt}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = build_mod.BuildConfig(sources=[str(src)], out=out, format=fmt, keep_obs=["cell_type"], jobs=1,
                                progress=False)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    build_mod.build(cfg, log=lambda _m: None)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    shutil.rmtree(out, ignore_errors=True)
    return wall, stage_seconds(stats), stats


def phases(src: Path, fmt: str, work: Path) -> list[tuple[str, float, float, float, int]]:
    """(phase, wall s, user s, system s, minor faults) for one real build of ``src`` as ``fmt``."""
    import os
    import resource

    from scpretrain.sharding import build as build_mod
    from scpretrain.sharding import tasks

    rows: list[tuple[str, float, float, float, int]] = []
    saved = {n: getattr(tasks, n) for n in ("make_plan", "run_phase1", "run_phase2", "finish")}

    def timed(name: str, fn: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            t0, f0, w0 = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                t1, f1 = os.times(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                rows.append((name, time.perf_counter() - w0, t1.user - t0.user, t1.system - t0.system, f1 - f0))
        return run

    out = work / f"corpus_{fmt}"
    shutil.rmtree(out, ignore_errors=True)
    for name, fn in saved.items():
        setattr(tasks, name, timed(name, fn))
    try:
        build_mod.build(build_mod.BuildConfig(sources=[str(src)], out=out, format=fmt, jobs=1, progress=False),
                        log=lambda _m: None)
    finally:
        for name, fn in saved.items():
            setattr(tasks, name, fn)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=19_331)
    p.add_argument("--nnz-per-cell", type=float, default=1_500)
    p.add_argument("--formats", default="zarr,soma,both")
    p.add_argument("--workdir", type=Path, default=REPO / "bench_out" / "corpus")
    p.add_argument("--top", type=int, default=12, help="also print the N functions with the most own time")
    p.add_argument("--phases", action="store_true", help="wall and CPU seconds per phase of the real build")
    args = p.parse_args(argv)
    if args.phases:
        from scpretrain.sharding.hugepages import restart_with_huge_pages

        restart_with_huge_pages()
    src = write_input_h5ad(args.workdir / "input" / f"synthetic_{args.cells}x{args.genes}.h5ad",
                           cells=args.cells, genes=args.genes, nnz_per_cell=args.nnz_per_cell, seed=0)
    if args.phases:
        print(f"\n### Build phases: {args.cells:,} cells x {args.genes:,} genes (one real build per format)\n")
        print("| format | phase | wall s | user s | system s | minor faults |\n|---|---|---:|---:|---:|---:|")
        for fmt in args.formats.split(","):
            for name, wall, user, system, faults in phases(src, fmt, args.workdir / "profile"):
                print(f"| {fmt} | {name} | {wall:.2f} | {user:.2f} | {system:.2f} | {faults:,} |")
        return 0
    rows = {}
    for fmt in args.formats.split(","):
        wall, stages, stats = profile_one(src, fmt, args.workdir / "profile")
        rows[fmt] = (wall, stages)
        print(f"\n--format {fmt}: {wall:.1f} s under the profiler ({args.cells / wall:,.0f} cells/s)")
        stats.sort_stats("tottime").print_stats(args.top)
    fmts = list(rows)
    print(f"\n### Build profile: {args.cells:,} cells x {args.genes:,} genes, ~{args.nnz_per_cell:,.0f} non-zeros "
          "per cell (CPU seconds per stage, one thread, cProfile)\n")
    print("| stage | " + " | ".join(f"--format {f}" for f in fmts) + " |\n|---|" + "---|" * len(fmts))
    for stage in STAGES:
        print(f"| {stage} | " + " | ".join(f"{rows[f][1][stage]:.1f}" for f in fmts) + " |")
    print("| **whole build (profiled)** | " + " | ".join(f"**{rows[f][0]:.1f}**" for f in fmts) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
