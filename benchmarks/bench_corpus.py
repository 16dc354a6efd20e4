"""Corpus build benchmark (not a test): our builder against anndata and tiledbsoma on the same input,
and a 20M-cell synthetic corpus with its wall time and peak memory.

  python -m benchmarks.bench_corpus                        # full size (run on a quiet machine)
  python -m benchmarks.bench_corpus --cells 20000 --big-cells 200000     # a quick check, a few minutes
  python -m benchmarks.bench_corpus --only big --big-cells 200000,20000000

(a) compare: one synthetic h5ad (default 200,000 cells x 19,331 genes, ~1,500 non-zeros per cell, CSR
    float32 counts, obs cell_type/dataset_id/donor_id; cached in WORKDIR/input/) is turned into
      - our Zarr shards:  python -m sharding build --source IN.h5ad --format zarr   (--jobs 1; with
                          --jobs-compare also --jobs min(4, cores), for Zarr and SOMA: phase 1 as that
                          many tasks, shards written by that many worker processes)
      - our SOMA output:  python -m sharding build --source IN.h5ad --format soma
      - anndata:          anndata.read_h5ad(IN) then adata.write_zarr(OUT)     (anndata's defaults)
      - tiledbsoma:       anndata.read_h5ad(IN) then tiledbsoma.io.from_anndata(OUT, adata, "RNA")
      - annbatch:         DatasetCollection(OUT).add_adatas([IN], shuffle=True) (its pre-shuffled store,
                          zarrs pipeline; in its own Python >= 3.12 venv, made in --venv-dir when missing,
                          as ``benchmarks.bench_loader`` makes it: ``benchmarks.peer_envs``)
    Each runs in its own process; the figures are end to end from the h5ad (ours also validate, align,
    shuffle across shards and checksum). Baselines also report their write step alone.
(b) big: python -m sharding build --source synthetic://cells=N,genes=2000,density=0.01 --format zarr, for
    each N in --big-cells (default 200,000 and 20,000,000: memory must not grow with N).

Per run: wall seconds, cells/s, bytes on disk per cell, and peak RSS, the largest resident set of the
run's process tree (os.wait4 on the child; a pass-2 worker counts when it is the largest; this process
stays at a few tens of MB, since Linux counts a parent's peak into a child's). Outputs are
deleted after measuring unless --keep. Tables are printed as markdown and saved, with all fields, to
WORKDIR/results.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BLOCK = 8192


@dataclass
class Run:
    name: str
    cells: int
    wall_s: float
    peak_rss_mb: float
    disk_bytes: int
    ok: bool
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.wall_s if self.wall_s else 0.0


# ---------------------------------------------------------------------------------------------- input


def write_input_h5ad(path: Path, *, cells: int, genes: int, nnz_per_cell: float, seed: int) -> Path:
    """The compare input, written block by block (X appended on disk): memory is one block plus obs.

    Reused when a file with the same parameters exists (generating counts is the slow part).
    """
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    from scpretrain.sharding.synthetic import SyntheticAtlas, SyntheticParams

    stamp = path.with_name(path.name + ".params")
    wanted = f"cells={cells},genes={genes},nnz_per_cell={nnz_per_cell},seed={seed}"
    if path.exists() and stamp.exists() and stamp.read_text() == wanted:
        print(f"input: reusing {path} ({wanted})")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    density = nnz_per_cell / genes
    atlas = SyntheticAtlas(SyntheticParams(cells=cells, genes=genes, density=density, seed=seed, types=12,
                                           datasets=4))
    tmp = path.with_name(path.name + ".tmp")
    counts, obs = atlas.generate(0, min(BLOCK, cells))
    obs_parts = [obs]
    var = pd.DataFrame({"symbol": [f"SYNG{j + 1:05d}" for j in range(genes)]},
                       index=[f"ENSG{j + 1:011d}" for j in range(genes)])
    ad.AnnData(X=counts, obs=obs, var=var).write_h5ad(tmp)
    started = time.perf_counter()
    with h5py.File(tmp, "r+") as f:
        x = sparse_dataset(f["X"])
        for start in range(BLOCK, cells, BLOCK):
            counts, obs = atlas.generate(start, start + BLOCK)
            x.append(counts)
            obs_parts.append(obs)
            done = min(start + BLOCK, cells)
            rate = done / (time.perf_counter() - started)
            print(f"\rinput: writing {path.name}: {done:,}/{cells:,} cells ({rate:,.0f}/s)", end="",
                  flush=True)
        full = pd.concat(obs_parts)
        for col in full.columns:
            full[col] = full[col].astype("category")
        del f["obs"]
        write_elem(f, "obs", full)
    print()
    os.replace(tmp, path)
    stamp.write_text(wanted)
    return path


# -------------------------------------------------------------------------------------- measurement


def measure(name: str, cmd: list[str], *, cells: int, out: Path | None, log: Path, notes: str = "") -> Run:
    """Run ``cmd`` in its own process; wall time, peak RSS (os.wait4) and the size of ``out``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"run: {name}: {' '.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as logf:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    ok = proc.returncode == 0
    extra: dict[str, Any] = {}
    text = log.read_text(errors="replace")
    for line in text.splitlines():  # a baseline prints one JSON line with its own step timings
        if line.startswith("BENCH "):
            extra = json.loads(line[len("BENCH "):])
    if not ok:
        tail = " | ".join(text.strip().splitlines()[-3:])
        print(f"  FAILED (exit {proc.returncode}): {tail}", file=sys.stderr)
    run = Run(name, cells, wall, usage.ru_maxrss / 1024, _du(out) if out else 0, ok, notes, extra)
    print(f"  {wall:,.1f} s, {run.cells_per_s:,.0f} cells/s, peak RSS {run.peak_rss_mb:,.0f} MB, "
          f"{run.disk_bytes / max(cells, 1):,.0f} B/cell", flush=True)
    return run


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


# ------------------------------------------------------------------------------------------ baselines


def baseline(kind: str, source: Path, out: Path) -> None:
    """Run one baseline in this process (a child of the benchmark) and print its step timings."""
    import warnings

    import anndata as ad

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    adata = ad.read_h5ad(source)
    t1 = time.perf_counter()
    if kind == "write_zarr":
        adata.write_zarr(out)
        fmt = f"zarr v{ad.settings.zarr_write_format}"
    elif kind == "from_anndata":
        import tiledbsoma.io

        tiledbsoma.io.from_anndata(str(out), adata, measurement_name="RNA")
        fmt = "tiledbsoma"
    else:
        raise SystemExit(f"unknown baseline {kind!r}")
    t2 = time.perf_counter()
    print("BENCH " + json.dumps({"read_s": round(t1 - t0, 3), "write_s": round(t2 - t1, 3), "format": fmt}))


# ------------------------------------------------------------------------------------------- sections


def run_compare(args: argparse.Namespace, work: Path) -> list[Run]:
    source = work / "input" / f"synthetic_{args.cells}x{args.genes}.h5ad"
    # in a child process: Linux carries a parent's peak RSS into its children's ru_maxrss (fork, then
    # exec records the old address space's high-water mark), so this process must stay small
    subprocess.run(_py("-m", "benchmarks.bench_corpus", "_input", str(source), str(args.cells),
                       str(args.genes), str(args.nnz_per_cell), str(args.seed)), cwd=REPO, check=True)
    runs = []
    builds = [("ours: Zarr shards (sharding build --format zarr)", "zarr", 1),
              ("ours: SOMA experiment (sharding build --format soma)", "soma", 1)]
    if args.jobs_compare:
        jobs = min(4, os.cpu_count() or 1)
        builds.insert(1, (f"ours: Zarr shards, --jobs {jobs} (phase 1 as {jobs} tasks, {jobs} shard writers)", "zarr",
                          jobs))
        builds.append((f"ours: SOMA experiment, --jobs {jobs} (phase 1 as {jobs} tasks, {jobs} shard writers)",
                       "soma", jobs))
    for name, fmt, jobs in builds:
        out = work / "out" / f"ours-{fmt}-j{jobs}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = _py("-m", "sharding", "build", "--source", str(source), "--out", str(out), "--format", fmt,
                  "--jobs", str(jobs), "--no-progress")
        runs.append(measure(name, cmd, cells=args.cells, out=out / fmt, log=work / "logs" / f"{out.name}.log",
                            notes="validate, align, shuffle across shards, checksum"))
        _clean(out, args.keep)
    # the same Zarr build split into 3 tasks (issue 17), run one after another here: what the split costs
    out = work / "out" / "ours-zarr-3tasks"
    shutil.rmtree(out, ignore_errors=True)
    sb = " ".join(_py("-m", "sharding", "build", "--out", str(out)))
    chain = [f"{sb} --source {source} --plan --tasks 3 --no-progress"]
    chain += [f"{sb} --task {t} --phase {ph} --no-progress" for ph in (1, 2) for t in range(3)]
    chain += [f"{sb} --finish"]
    runs.append(measure("ours: Zarr shards, split into 3 tasks (plan, 3 + 3 tasks, finish; in turn)",
                        ["bash", "-c", " && ".join(chain)], cells=args.cells, out=out / "zarr",
                        log=work / "logs" / "ours-zarr-3tasks.log",
                        notes="8 processes in turn; identical shards to the one-process build"))
    _clean(out, args.keep)
    if not args.skip_baselines:
        for name, kind, suffix in (("anndata: read_h5ad + write_zarr", "write_zarr", ".zarr"),
                                   ("tiledbsoma: read_h5ad + io.from_anndata", "from_anndata", ".soma")):
            out = work / "out" / f"baseline-{kind}{suffix}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = _py("-m", "benchmarks.bench_corpus", "_baseline", kind, str(source), str(out))
            run = measure(name, cmd, cells=args.cells, out=out, log=work / "logs" / f"baseline-{kind}.log")
            if run.extra:
                read_s, write_s = run.extra["read_s"], run.extra["write_s"]
                run.notes = (f"{run.extra['format']}; read {read_s:.1f} s, write {write_s:.1f} s "
                             f"({args.cells / max(write_s, 1e-9):,.0f} cells/s writing alone)")
            runs.append(run)
            _clean(out, args.keep)
        runs.append(run_annbatch(args, work, source))
    return runs


def run_annbatch(args: argparse.Namespace, work: Path, source: Path) -> Run:
    """annbatch's writer on the same h5ad, with the settings ``bench_loader`` builds its collection with."""
    from benchmarks.loader_stores import ANNBATCH_BUILD
    from benchmarks.peer_envs import PEERS, ensure_venv

    name = "annbatch: DatasetCollection.add_adatas(shuffle=True)"
    venv = ensure_venv("annbatch", args.venv_dir.resolve(), skip_create=False)
    if venv.python is None:
        print(f"  annbatch not run: {venv.reason}", file=sys.stderr)
        return Run(name, args.cells, 0.0, 0.0, 0, False, f"not run: {venv.reason}")
    out = work / "out" / "baseline-annbatch"
    shutil.rmtree(out, ignore_errors=True)
    result = work / "logs" / "annbatch.result.json"
    spec = {"mode": "build", "store": str(out), "h5ad": str(source), "n_cells": args.cells, **ANNBATCH_BUILD,
            "seed": args.seed, "result": str(result)}
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "logs" / "annbatch.spec.json").write_text(json.dumps(spec))
    run = measure(name, [venv.python, str(PEERS / "annbatch_run.py"), str(work / "logs" / "annbatch.spec.json")],
                  cells=args.cells, out=out, log=work / "logs" / "baseline-annbatch.log")
    if run.ok and result.exists():
        r = json.loads(result.read_text())
        run.notes = (f"annbatch {venv.versions.get('annbatch')}, zarrs {venv.versions.get('zarrs')}; "
                     f"add_adatas {r['seconds']:.1f} s; {json.dumps(ANNBATCH_BUILD)}")
    _clean(out, args.keep)
    return run


def ratios(runs: list[Run]) -> list[str]:
    """The issue's targets, from this run's wall times: Zarr vs annbatch's writer, SOMA vs from_anndata."""
    find = {k: next((r for r in runs if r.ok and r.name.startswith(k)), None)
            for k in ("ours: Zarr shards (", "ours: SOMA", "annbatch:", "tiledbsoma:", "anndata:")}
    lines = []
    for ours, theirs, target in (("ours: Zarr shards (", "annbatch:", 2.0), ("ours: SOMA", "tiledbsoma:", 10.0),
                                 ("ours: Zarr shards (", "anndata:", None)):
        a, b = find[ours], find[theirs]
        if a and b:
            goal = f" (target >= {target:g}x: {'met' if a.cells_per_s >= target * b.cells_per_s else 'missed'})" \
                if target else ""
            lines.append(f"- {a.name} vs {b.name}: {a.cells_per_s / b.cells_per_s:.2f}x{goal}")
    return lines


def run_big(args: argparse.Namespace, work: Path) -> list[Run]:
    runs = []
    density = args.big_nnz_per_cell / args.big_genes
    for n in args.big_cells:
        out = work / "out" / f"big-{n}"
        shutil.rmtree(out, ignore_errors=True)
        spec = f"synthetic://cells={n},genes={args.big_genes},density={density:g},types=12,datasets=4,seed=0"
        cmd = _py("-m", "sharding", "build", "--source", spec, "--out", str(out), "--format", args.big_format,
                  "--jobs", str(args.jobs), "--no-progress")
        runs.append(measure(f"{n:,} cells x {args.big_genes:,} genes ({args.big_format})", cmd, cells=n,
                            out=out, log=work / "logs" / f"big-{n}.log",
                            notes=f"~{args.big_nnz_per_cell:g} non-zeros per cell, generated on the fly"))
        _clean(out, args.keep)
    return runs


def _clean(out: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- report


def table(runs: list[Run], title: str) -> str:
    lines = [f"### {title}", "",
             "| run | cells | wall (s) | cells/s | bytes/cell on disk | peak RSS (MB) | notes |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        status = "" if r.ok else "**failed** "
        lines.append(f"| {r.name} | {r.cells:,} | {r.wall_s:,.1f} | {r.cells_per_s:,.0f} | "
                     f"{r.disk_bytes / max(r.cells, 1):,.0f} | {r.peak_rss_mb:,.0f} | {status}{r.notes} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_corpus",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--only", choices=("compare", "big"), help="run one section (default: both)")
    p.add_argument("--cells", type=int, default=200_000, help="compare: cells in the input h5ad")
    p.add_argument("--genes", type=int, default=19_331, help="compare: genes in the input h5ad")
    p.add_argument("--nnz-per-cell", type=float, default=1_500, help="compare: mean non-zeros per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-baselines", action="store_true", help="compare: only our builds")
    p.add_argument("--jobs-compare", action="store_true",
                   help="compare: also build Zarr and SOMA with --jobs min(4, cores)")
    p.add_argument("--big-cells", default="200000,20000000",
                   help="big: comma-separated corpus sizes (default 200000,20000000)")
    p.add_argument("--big-genes", type=int, default=2_000)
    p.add_argument("--big-nnz-per-cell", type=float, default=20)
    p.add_argument("--big-format", default="zarr", choices=("zarr", "soma", "both"))
    p.add_argument("--jobs", type=int, default=1, help="big: --jobs for the builds (default 1)")
    p.add_argument("--workdir", type=Path, default=REPO / "bench_out" / "corpus",
                   help="inputs, outputs, logs and results (default bench_out/corpus)")
    p.add_argument("--venv-dir", type=Path, default=REPO / "bench_out",
                   help="compare: where venv-annbatch lives or is made (default bench_out, as bench_loader)")
    p.add_argument("--keep", action="store_true",
                   help="keep the built stores (default: delete them after measuring)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_baseline"]:  # internal: one baseline, run as a child process by `measure`
        baseline(argv[1], Path(argv[2]), Path(argv[3]))
        return 0
    if argv[:1] == ["_input"]:  # internal: write the compare input, in a child process
        write_input_h5ad(Path(argv[1]), cells=int(argv[2]), genes=int(argv[3]), nnz_per_cell=float(argv[4]),
                         seed=int(argv[5]))
        return 0
    args = _parser().parse_args(argv)
    try:
        args.big_cells = [int(v) for v in str(args.big_cells).split(",") if v]
    except ValueError:
        raise SystemExit(f"--big-cells {args.big_cells!r}: expected comma-separated integers") from None
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sections = []
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = f"{os.cpu_count()} cores, {os.uname().machine}, {_mem_gb():.0f} GB RAM"
    if args.only in (None, "compare"):
        runs = run_compare(args, work)
        sections.append((f"Build throughput from one h5ad ({args.cells:,} cells x {args.genes:,} genes, "
                         f"~{args.nnz_per_cell:,.0f} non-zeros per cell)", runs))
        compare_ratios = ratios(runs)
    if args.only in (None, "big"):
        runs = run_big(args, work)
        sections.append((f"Synthetic corpora built from synthetic:// ({args.big_genes:,} genes, "
                         f"~{args.big_nnz_per_cell:g} non-zeros per cell)", runs))
    report = [f"Corpus build benchmark, {started}, {machine}", ""]
    for title, runs in sections:
        report += [table(runs, title), ""]
        if title.startswith("Build throughput"):
            report += ["Ratios (cells/s, this run):", *compare_ratios, ""]
    text = "\n".join(report)
    print("\n" + text)
    (work / "results.md").write_text(text + "\n")
    (work / "results.json").write_text(json.dumps(
        {"started": started, "machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
         "sections": [{"title": t, "runs": [{**asdict(r), "cells_per_s": r.cells_per_s} for r in runs]}
                      for t, runs in sections]}, indent=2) + "\n")
    print(f"\nsaved {work / 'results.md'} and {work / 'results.json'}")
    return 0 if all(r.ok for _, runs in sections for r in runs) else 1


def _mem_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        return 0.0


if __name__ == "__main__":
    sys.exit(main())
