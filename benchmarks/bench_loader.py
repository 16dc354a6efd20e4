"""Loader benchmark: our StreamingLoader (Zarr and SOMA) against annbatch, scDataset, tiledbsoma-ml and
AnnLoader, plus sequential-read ceilings, all on stores built from one synthetic h5ad.

    python -m benchmarks.bench_loader                      # full size: 200k cells x 19,331 genes
    python -m benchmarks.bench_loader --cells 5000 --genes 2000 --nnz-per-cell 200   # a quick check
    python -m benchmarks.bench_loader --rss-scale          # also: our RSS at 200k vs 20M cells

What it does (see benchmarks/README.md for the columns):

1. writes the source: N cells x G genes, ~nnz-per-cell non-zeros, stored sorted by cell type
   (benchmarks/loader_data.py), as an uncompressed CSR h5ad;
2. builds every store from it: our corpus (``python -m sharding build --format both``: Zarr
   shards + a TileDB-SOMA experiment, pre-shuffled), annbatch's pre-shuffled collection
   (in its own venv, Python >= 3.12); the h5ad itself serves scDataset and AnnLoader, the
   corpus's soma/ serves tiledbsoma-ml;
3. creates the peers' virtual environments when missing (``bench_out/venv-annbatch``,
   ``bench_out/venv-peers``), never touching the project's .venv;
4. runs every loader in its own subprocess (so peak RSS is per loader), with the store read
   once beforehand (warm page cache), and reports cells/s, time to the first batch, peak RSS
   and shuffle quality in a markdown table (also written to OUT/results.md and results.json).

A peer that cannot be installed or run shows as "unavailable: <why>" / "failed: <why>"; the
benchmark goes on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.loader_report import report
from benchmarks.loader_stores import build_annbatch, build_corpus, stamp_ok, tree_bytes, warm
from benchmarks.peer_envs import PEERS, ROOT, ensure_venv, log, peer_env, project_env, run_sampled

PROJECT_PY = sys.executable


GROUPS = ("ours", "annbatch", "scdataset", "tiledbsoma-ml", "annloader", "ceilings", "steady", "sorted")


# ----------------------------------------------------------------------------- runs


@dataclass
class Run:
    key: str  # unique id, also the tags --only matches (split on '/')
    group: str
    loader: str
    store: str
    output: str
    workers: str
    python: str | None
    script: str
    spec: dict
    warm: list[Path]
    env: dict | None = None
    unavailable: str | None = None
    quality: bool = True
    result: dict = field(default_factory=dict)


def execute(run: Run, runs_dir: Path, timeout: float, stall: float = 180) -> dict:
    if run.unavailable:
        return {"status": f"unavailable: {run.unavailable}"}
    name = run.key.split("/")[-1]
    spec_path = runs_dir / f"{name}.spec.json"
    res_path = runs_dir / f"{name}.result.json"
    res_path.unlink(missing_ok=True)
    spec = {**run.spec, "result": str(res_path)}
    spec_path.write_text(json.dumps(spec, indent=1))
    warm(run.warm)
    log(f"run {name}")
    progress = Path(str(res_path) + ".progress")
    pr = run_sampled([run.python, str(PEERS / run.script), str(spec_path)], log_path=runs_dir / f"{name}.log",
                     timeout=timeout, env=run.env, progress=progress, stall=stall)
    try:
        res = json.loads(res_path.read_text())
    except (OSError, json.JSONDecodeError):
        res = {"status": f"failed: exit code {pr.rc}, no result; log tail: {pr.log_tail.strip()[-300:]}"}
    if pr.stalled:
        try:
            got = progress.read_text().strip() or "0"
        except OSError:
            got = "0"
        res["status"] = (f"failed: stalled (hang?): no batch for {stall:.0f} s after {int(got):,} cells; "
                         "killed")
    elif pr.timed_out:
        res["status"] = f"failed: timed out after {timeout:.0f} s"
    elif pr.rc != 0 and res.get("status") == "ok":  # measured, then crashed on the way out: keep, but say so
        last = [ln for ln in pr.log_tail.strip().splitlines() if ln.strip()][-1:] or [""]
        res["status"] = f"ok, but exit code {pr.rc} after measuring ({last[0][:80]})"
    res["peak_tree_mb"] = pr.peak_tree_mb
    res["wall_s"] = pr.seconds
    res["log"] = str(runs_dir / f"{name}.log")
    return res


def _entropy(h: np.ndarray) -> np.ndarray:
    h = np.atleast_2d(np.asarray(h, dtype=np.float64))
    tot = h.sum(axis=1, keepdims=True)
    p = np.divide(h, tot, out=np.zeros_like(h), where=tot > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)


class Quality:
    """Shuffle quality: mean over batches of H(batch labels) / E[H(a random batch of the same size)].

    The random batch is drawn without replacement from the corpus's label counts
    (multivariate hypergeometric), its expected entropy estimated from ``samples`` draws.
    """

    def __init__(self, type_counts: list[int], samples: int = 400, seed: int = 0):
        self.counts = np.asarray(type_counts, dtype=np.int64)
        self.samples, self.rng, self.cache = samples, np.random.default_rng(seed), {}

    def expected(self, size: int) -> float:
        if size not in self.cache:
            size_ok = min(size, int(self.counts.sum()))
            draws = self.rng.multivariate_hypergeometric(self.counts, size_ok, size=self.samples)
            self.cache[size] = float(_entropy(draws).mean())
        return self.cache[size]

    def __call__(self, hist: list[list[int]]) -> float | None:
        if not hist:
            return None
        h = np.asarray(hist)
        sizes = h.sum(axis=1)
        ent = _entropy(h)
        exp = np.array([self.expected(int(s)) for s in sizes])
        ok = exp > 0
        return float(np.mean(ent[ok] / exp[ok])) if ok.any() else None


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_loader",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=200_000, help="cells in the source h5ad (default 200,000)")
    p.add_argument("--genes", type=int, default=19_331, help="genes (default 19,331)")
    p.add_argument("--nnz-per-cell", type=float, default=1500, help="mean non-zeros per cell (default 1,500)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--measure-cells", type=int, default=0,
                   help="cells each loader reads, timed (default: one pass over min(cells, 200,000))")
    p.add_argument("--out-dir", type=Path, default=Path("bench_out/loader"))
    p.add_argument("--venv-dir", type=Path, default=Path("bench_out"),
                   help="where venv-annbatch and venv-peers live (default bench_out)")
    p.add_argument("--only", default="", help=f"comma list of run groups or run ids: {', '.join(GROUPS)}, "
                   "ours-zarr, ours-soma, ... (default: all)")
    p.add_argument("--skip-build", action="store_true",
                   help="use the source and stores already in --out-dir; fail rather than build them")
    p.add_argument("--no-venv-create", action="store_true", help="do not create missing peer venvs")
    p.add_argument("--workers", default="0,1,2", help="DataLoader workers for our loader (default 0,1,2)")
    p.add_argument("--soma-ml-workers", default="0,2", help="workers for tiledbsoma-ml (default 0,2)")
    p.add_argument("--ours-opts", default="",
                   help="extra StreamingLoader kwargs, e.g. block_size=512,window_batches=16")
    p.add_argument("--build-opts", default="",
                   help="extra `sharding build` options for our corpus, e.g. '--codec blosc-lz4' (part of its stamp)")
    p.add_argument("--sorted-soma", action="store_true",
                   help="also write the source, in its type-sorted order, as a SOMA experiment and run ours "
                        "(streaming it without a corpus) and tiledbsoma-ml on it")
    p.add_argument("--steady", action="store_true",
                   help="also time ours (zarr, 0 workers) and annbatch on a second pass in the same process")
    p.add_argument("--corpus-name", default="corpus", help="folder under OUT/stores for our corpus (default corpus)")
    p.add_argument("--jobs", type=int, default=2, help="processes for data generation and store builds")
    p.add_argument("--timeout", type=float, default=900, help="seconds per loader run before it is killed")
    p.add_argument("--stall", type=float, default=180,
                   help="kill a run that shows no progress (a batch) for this many seconds, as a hang "
                        "(default 180)")
    p.add_argument("--build-timeout", type=float, default=4 * 3600, help="seconds per store build")
    p.add_argument("--ours-mp-context", default="",
                   help="start our loader's DataLoader workers with this multiprocessing context "
                        "(spawn | forkserver; default: as the loader does, i.e. fork)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also cProfile our loader (Zarr and SOMA, 0 workers, read-ahead off) and print its "
                        "hottest functions")
    g = p.add_argument_group("RSS vs corpus size (our loader)")
    g.add_argument("--rss-scale", action="store_true",
                   help="also measure our loader's peak RSS on a small vs a large synthetic corpus")
    g.add_argument("--rss-cells", default="200000,20000000", help="small,large corpus sizes")
    g.add_argument("--rss-genes", type=int, default=2000)
    g.add_argument("--rss-density", type=float, default=0.01, help="(~20 non-zeros per cell at 2,000 genes)")
    g.add_argument("--rss-batches", type=int, default=40, help="batches read in both corpora")
    g.add_argument("--rss-backends", default="zarr,soma")
    g.add_argument("--rss-workers", default="0,2")
    return p.parse_args(argv)


def _kv(s: str) -> dict:
    out = {}
    for item in filter(None, s.split(",")):
        k, _, v = item.partition("=")
        try:
            out[k.strip()] = int(v)
        except ValueError:
            out[k.strip()] = float(v) if v.replace(".", "", 1).isdigit() else v
    return out


def selected(key: str, only: set[str]) -> bool:
    if not only:
        return True
    parts = key.split("/")
    return any(o == key or o in parts or any(p.startswith(o) for p in parts) for o in only)


def main(argv=None) -> int:
    a = parse_args(argv)
    from benchmarks.loader_data import corpus_labels, h5ad_labels, soma_labels, write_sorted_h5ad

    out = a.out_dir if a.out_dir.is_absolute() else ROOT / a.out_dir
    venv_dir = a.venv_dir if a.venv_dir.is_absolute() else ROOT / a.venv_dir
    out.mkdir(parents=True, exist_ok=True)
    runs_dir, stores, data = out / "runs", out / "stores", out / "data"
    for d in (runs_dir, stores, data):
        d.mkdir(exist_ok=True)
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    measure = a.measure_cells or min(a.cells, 200_000)
    B = a.batch_size
    t_start = time.perf_counter()

    # 1. source
    h5ad = data / "source.h5ad"
    if a.skip_build:
        info_path = h5ad.with_name(h5ad.name + ".json")
        if not h5ad.exists() or not info_path.exists():
            sys.exit(f"error: --skip-build: {h5ad} is missing")
        src = json.loads(info_path.read_text())
        want = {"cells": a.cells, "genes": a.genes, "nnz_per_cell": a.nnz_per_cell}
        if any(src["params"][k] != v for k, v in want.items()):
            sys.exit(f"error: --skip-build: {h5ad} was written with {src['params']}, not {want}")
    else:
        log(f"source: {a.cells:,} cells x {a.genes:,} genes, ~{a.nnz_per_cell:g} nnz/cell, "
            "sorted by cell type")
        src = write_sorted_h5ad(h5ad, cells=a.cells, genes=a.genes, nnz_per_cell=a.nnz_per_cell, seed=a.seed,
                                jobs=a.jobs, log=log)
    types = src["types"]
    quality = Quality(src["type_counts"], seed=a.seed)

    # 2. plan the runs; what they need decides which venvs and stores are made
    corpus, ab_store = stores / a.corpus_name, stores / "annbatch.zarr"
    soma_uri = corpus / "soma"
    lab_dir = out / "labels"
    lab_dir.mkdir(exist_ok=True)
    lab_h5ad, lab_corpus, lab_soma = (lab_dir / "h5ad_rows.npy", lab_dir / "corpus_cell_id.npy",
                                      lab_dir / "soma_joinid.npy")
    common = {"batch_size": B, "cells": measure, "n_types": len(types), "seed": a.seed}
    ours_opts = _kv(a.ours_opts)
    pe, ve = project_env(), peer_env()
    runs: list[Run] = []
    for backend in ("zarr", "soma"):
        for w in [int(x) for x in a.workers.split(",") if x.strip()]:
            runs.append(Run(f"ours/ours-{backend}/ours-{backend}-w{w}", "ours",
                            f"**ours** StreamingLoader ({backend})",
                            "our corpus (pre-shuffled)" if backend == "zarr" else "our corpus's soma/",
                            "CSR", str(w), PROJECT_PY, "ours.py",
                            {**common, "corpus": str(corpus), "backend": backend, "num_workers": w,
                             "labels": str(lab_corpus), "loader_opts": ours_opts,
                             "mp_context": a.ours_mp_context},
                            [corpus / "zarr" if backend == "zarr" else soma_uri], pe))
    runs.append(Run("annbatch/annbatch-tuned", "annbatch", "annbatch, chunk 64 x preload 256 (tuned), zarrs",
                    "its own pre-shuffled collection", "CSR", "0", None, "annbatch_run.py",
                    {**common, "mode": "load", "store": str(ab_store), "types": types, "chunk_size": 64,
                     "preload_nchunks": 256}, [ab_store], ve))
    if a.steady:  # the same two loaders after one whole untimed pass in the same process
        runs.append(Run("steady/ours-zarr-w0-steady", "steady", "**ours** StreamingLoader (zarr), 2nd pass",
                        "our corpus (pre-shuffled)", "CSR", "0", PROJECT_PY, "ours.py",
                        {**common, "corpus": str(corpus), "backend": "zarr", "num_workers": 0,
                         "labels": str(lab_corpus), "loader_opts": ours_opts, "warm_passes": 1},
                        [corpus / "zarr"], pe))
        runs.append(Run("steady/annbatch-tuned-steady", "steady", "annbatch, chunk 64 x preload 256 (tuned), 2nd pass",
                        "its own pre-shuffled collection", "CSR", "0", None, "annbatch_run.py",
                        {**common, "mode": "load", "store": str(ab_store), "types": types, "chunk_size": 64,
                         "preload_nchunks": 256, "warm_passes": 1}, [ab_store], ve))
    runs.append(Run("scdataset/scdataset-w0", "scdataset", "scDataset, BlockShuffling(8), fetch factor 16",
                    "backed h5ad", "CSR", "0", None, "scdataset_run.py",
                    {**common, "h5ad": str(h5ad), "labels": str(lab_h5ad)}, [h5ad], ve))
    for w in [int(x) for x in a.soma_ml_workers.split(",") if x.strip()]:
        runs.append(Run(f"tiledbsoma-ml/tiledbsoma-ml-w{w}", "tiledbsoma-ml",
                        "tiledbsoma-ml ExperimentDataset (defaults: shuffle chunk 64, io batch 65,536)",
                        "our corpus's soma/", "dense", str(w), None, "tiledbsoma_ml_run.py",
                        {**common, "soma": str(soma_uri), "num_workers": w, "labels": str(lab_soma)},
                        [soma_uri], ve))
    runs.append(Run("annloader/annloader-w0", "annloader", "AnnLoader (anndata.experimental)", "backed h5ad",
                    "dense", "0", PROJECT_PY, "annloader_run.py",
                    {**common, "h5ad": str(h5ad), "labels": str(lab_h5ad)}, [h5ad], pe))
    ceil = [("ceiling-h5py", "ceiling: sequential h5py read of the uncompressed h5ad, 32k rows/read",
             "source h5ad", "CSR", {"mode": "h5py", "rows": 32768, "h5ad": str(h5ad)}, [h5ad]),
            ("ceiling-h5py-reuse", "ceiling: the same, read into two reused buffers (read_direct)",
             "source h5ad", "CSR", {"mode": "h5py", "rows": 32768, "h5ad": str(h5ad), "reuse": True}, [h5ad]),
            ("ceiling-zarr", "ceiling: sequential zarr-python read of our Zarr shards, whole shards",
             "our corpus", "CSR", {"mode": "zarr", "rows": 65536, "corpus": str(corpus)}, [corpus / "zarr"]),
            ("ceiling-zarr-numcodecs", "ceiling: our Zarr chunk files decoded by numcodecs, 2 threads",
             "our corpus", "CSR", {"mode": "zarr-numcodecs", "threads": 2, "corpus": str(corpus)},
             [corpus / "zarr"]),
            ("ceiling-soma-4k", "ceiling: sequential TileDB-SOMA reads via Arrow, 4,096 rows/read",
             "our corpus's soma/", "COO", {"mode": "soma-arrow", "rows": 4096, "soma": str(soma_uri)},
             [soma_uri]),
            ("ceiling-soma-8k", "ceiling: sequential TileDB-SOMA reads via Arrow, 8,192 rows/read",
             "our corpus's soma/", "COO", {"mode": "soma-arrow", "rows": 8192, "soma": str(soma_uri)},
             [soma_uri]),
            ("ceiling-soma-64k", "ceiling: sequential TileDB-SOMA reads via Arrow, 65,536 rows/read",
             "our corpus's soma/", "COO", {"mode": "soma-arrow", "rows": 65536, "soma": str(soma_uri)},
             [soma_uri]),
            ("cost-densify", (f"cost: densify CSR to float32 [{B:,} x {a.genes:,}] on the CPU "
             "(torch, 1 thread)"),
             "—", "dense", {"mode": "densify", "h5ad": str(h5ad)}, [])]
    sorted_soma = stores / "sorted.soma"
    if a.sorted_soma:  # a SOMA experiment sorted by cell type: where block shuffling matters
        for w in [int(x) for x in a.workers.split(",") if x.strip()]:
            runs.append(Run(f"sorted/ours-soma-sorted-w{w}", "sorted", "**ours** StreamingLoader (soma_uri, no corpus)",
                            "type-sorted SOMA", "CSR", str(w), PROJECT_PY, "ours.py",
                            {**common, "corpus": None, "backend": "soma", "num_workers": w,
                             "labels": str(lab_h5ad), "loader_opts": {**ours_opts, "soma_uri": str(sorted_soma)}},
                            [sorted_soma], pe))
        for w in [int(x) for x in a.soma_ml_workers.split(",") if x.strip()]:
            runs.append(Run(f"sorted/tiledbsoma-ml-sorted-w{w}", "sorted", "tiledbsoma-ml ExperimentDataset (defaults)",
                            "type-sorted SOMA", "dense", str(w), None, "tiledbsoma_ml_run.py",
                            {**common, "soma": str(sorted_soma), "num_workers": w, "labels": str(lab_h5ad)},
                            [sorted_soma], ve))
    for key, name, store, outp, spec, wpaths in ceil:
        runs.append(Run(f"ceilings/{key}", "ceilings", name, store, outp, "0", PROJECT_PY, "ceilings.py",
                        {**common, **spec}, wpaths, pe, quality=False))
    runs = [r for r in runs if selected(r.key, only)]
    uses_corpus = any(str(corpus) in json.dumps(r.spec) for r in runs) or a.profile

    # 3. venvs (only those needed)
    venvs = {}
    if any(r.group == "annbatch" or r.key.startswith("steady/annbatch") for r in runs):
        venvs["annbatch"] = ensure_venv("annbatch", venv_dir, skip_create=a.no_venv_create)
    if any(r.group in ("scdataset", "tiledbsoma-ml") or "tiledbsoma-ml" in r.key for r in runs):
        venvs["peers"] = ensure_venv("peers", venv_dir, skip_create=a.no_venv_create)
    for r in runs:
        v = (venvs.get("annbatch" if "annbatch" in r.key else "peers")) if r.python is None else None
        if v is not None:
            r.python, r.unavailable = v.python, v.reason

    # 4. stores
    builds: dict[str, dict] = {"source h5ad (type-sorted, uncompressed)": {
        "seconds": src.get("total_s"), "cells": src["n_cells"], "bytes": src["bytes"], "status": "ok"}}
    corpus_err = None
    if uses_corpus:
        try:
            binfo = build_corpus(str(h5ad), corpus, fmt="both", jobs=a.jobs, timeout=a.build_timeout,
                                 skip_build=a.skip_build, params=src["params"], extra=a.build_opts.split())
            builds["our corpus (sharding build --format both)"] = {
                "seconds": binfo["seconds"], "cells": binfo["n_cells"], "peak_tree_mb": binfo["peak_tree_mb"],
                "bytes": binfo["bytes"], "status": "ok"}
        except (RuntimeError, FileNotFoundError) as e:
            corpus_err = f"our corpus could not be built: {e}"
            builds["our corpus (sharding build --format both)"] = {"status": f"failed: {e}"[:300]}
    if a.sorted_soma and any(r.group == "sorted" for r in runs):
        stamp = sorted_soma.with_name(sorted_soma.name + ".json")
        if not (sorted_soma.exists() and stamp_ok(stamp, src["params"])):
            log("building the type-sorted SOMA experiment (our SOMA writer, the source's row order)")
            shutil.rmtree(sorted_soma, ignore_errors=True)
            code = ("import sys; from pathlib import Path; from benchmarks.loader_data import write_sorted_soma; "
                    "write_sorted_soma(Path(sys.argv[1]), Path(sys.argv[2]))")
            pr = run_sampled([PROJECT_PY, "-c", code, str(h5ad), str(sorted_soma)],
                             log_path=runs_dir / "sorted-soma-build.log", timeout=a.build_timeout, env=pe)
            if pr.rc != 0:
                raise SystemExit(f"writing the sorted SOMA failed: {pr.log_tail[-600:]}")
            stamp.write_text(json.dumps({"params": src["params"], "seconds": pr.seconds}))
            builds["type-sorted SOMA (our writer, source row order)"] = {
                "seconds": pr.seconds, "cells": src["n_cells"], "peak_tree_mb": pr.peak_tree_mb,
                "bytes": tree_bytes(sorted_soma), "status": "ok"}
    ab_err = None
    if "annbatch" in venvs and venvs["annbatch"].python:
        ab_err = build_annbatch(venvs["annbatch"].python, h5ad, ab_store, src, runs_dir, builds, a)

    # 5. labels (cell-type codes per id space; small)
    np.save(lab_h5ad, h5ad_labels(h5ad, types))
    if uses_corpus and corpus_err is None:
        np.save(lab_corpus, corpus_labels(corpus, types))
        np.save(lab_soma, soma_labels(soma_uri, types))
    for r in runs:
        if r.unavailable is None and corpus_err and str(corpus) in json.dumps(r.spec):
            r.unavailable = corpus_err
        if r.unavailable is None and ab_err and "annbatch" in r.key:
            r.unavailable = ab_err

    rows = []
    # 6. measure
    for r in runs:
        res = execute(r, runs_dir, a.timeout, a.stall)
        if r.quality and str(res.get("status")).startswith("ok"):
            res["shuffle_quality"] = quality(res.get("label_hist") or [])
        r.result = res
        rows.append({"key": r.key.split("/")[-1], "group": r.group, "loader": r.loader, "store": r.store,
                     "output": r.output, "workers": r.workers,
                     "result": {k: v for k, v in res.items() if k not in ("label_hist", "batch_sizes")}})

    # 7. profile (optional): our loader, 0 workers, read-ahead off (so the reads are in the profiled thread)
    profiles: dict[str, str] = {}
    if a.profile and corpus_err is None:
        import io
        import pstats

        for backend in ("zarr", "soma"):
            prof = runs_dir / f"profile-{backend}.prof"
            r = Run(f"profile-{backend}", "ours", "", "", "", "0", PROJECT_PY, "ours.py",
                    {**common, "corpus": str(corpus), "backend": backend, "num_workers": 0,
                     "labels": str(lab_corpus), "loader_opts": {**ours_opts, "read_ahead": 0},
                     "profile": str(prof)},
                    [corpus / "zarr" if backend == "zarr" else soma_uri], pe)
            res = execute(r, runs_dir, a.timeout, a.stall)
            if str(res.get("status")).startswith("ok"):
                own, cum = io.StringIO(), io.StringIO()
                pstats.Stats(str(prof), stream=own).sort_stats("tottime").print_stats(15)
                pstats.Stats(str(prof), stream=cum).sort_stats("cumulative").print_stats(30)
                profiles[backend] = own.getvalue()
                (out / f"profile_ours_{backend}_w0.txt").write_text(own.getvalue() + "\n" + cum.getvalue())

    # 8. RSS vs corpus size
    rss_rows = []
    if a.rss_scale:
        sizes = [int(x) for x in a.rss_cells.split(",")]
        backends = [b for b in a.rss_backends.split(",") if b]
        fmt = "both" if set(backends) >= {"zarr", "soma"} else backends[0]
        for n in sizes:
            spec_src = (f"synthetic://cells={n},genes={a.rss_genes},types=12,datasets=4,seed={a.seed},"
                        f"density={a.rss_density}")
            cdir = stores / f"rss-{n}"
            try:
                binfo = build_corpus(spec_src, cdir, fmt=fmt, jobs=a.jobs, timeout=a.build_timeout,
                                     skip_build=a.skip_build, params={"spec": spec_src})
                builds[f"our corpus, synthetic {n:,} cells ({fmt})"] = {
                    "seconds": binfo["seconds"], "cells": binfo["n_cells"],
                    "peak_tree_mb": binfo["peak_tree_mb"], "bytes": binfo["bytes"], "status": "ok"}
                err = None
            except (RuntimeError, FileNotFoundError) as e:
                err = str(e)
            for backend in backends:
                for w in [int(x) for x in a.rss_workers.split(",")]:
                    key = f"rss-{backend}-w{w}-{n}"
                    run = Run(key, "rss", "", "", "", str(w), PROJECT_PY, "ours.py",
                              {"batch_size": B, "batches": a.rss_batches, "cells": 0, "seed": a.seed,
                               "corpus": str(cdir), "backend": backend, "num_workers": w,
                               "loader_opts": ours_opts, "mp_context": a.ours_mp_context},
                              [cdir / ("zarr" if backend == "zarr" else "soma")], pe, err)
                    res = execute(run, runs_dir, a.timeout, a.stall)
                    rss_rows.append({"backend": backend, "workers": w, "corpus_cells": n,
                                     "result": {k: v for k, v in res.items()
                                                if k not in ("label_hist", "batch_sizes")}})

    # 9. report
    md = report(a, src, measure, rows, builds, rss_rows, venvs, profiles, time.perf_counter() - t_start)
    print(md)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({
        "params": {"cells": a.cells, "genes": a.genes, "nnz_per_cell": a.nnz_per_cell, "batch_size": B,
                   "measure_cells": measure, "seed": a.seed},
        "source": src, "builds": builds, "runs": rows, "rss_scale": rss_rows,
        "venvs": {k: vars(v) for k, v in venvs.items()}}, indent=1, default=str))
    log(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
