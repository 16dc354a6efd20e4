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
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
PROJECT_PY = sys.executable

ANNBATCH_PKGS = ["annbatch[zarrs,numba]==0.3.1", "zarrs==0.2.3", "psutil"]
PEER_PKGS = ["tiledbsoma-ml==0.1.0", "scdataset==0.3.0", "psutil"]
TORCH_PIN = "torch==2.13.0"  # as in the Makefile: a local CPU build; unpinned would pull CUDA wheels

GROUPS = ("ours", "annbatch", "scdataset", "tiledbsoma-ml", "annloader", "ceilings", "steady", "sorted")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- subprocess + RSS


@dataclass
class Proc:
    rc: int | None
    seconds: float
    peak_tree_mb: float | None  # sampled sum of RSS over the process and its descendants
    timed_out: bool
    stalled: bool
    log_tail: str


def run_sampled(cmd: list[str], *, log_path: Path, timeout: float, env: dict | None = None,
                cwd: Path = ROOT, progress: Path | None = None, stall: float = 0) -> Proc:
    """Run ``cmd`` (output to ``log_path``) while sampling the RSS of its whole process tree.

    Killed (with its workers: it runs in its own session) after ``timeout`` seconds, or when
    ``progress`` (a file the runner touches per batch) has not changed for ``stall`` seconds.
    """
    try:
        import psutil
    except ImportError:  # sampling is a bonus: getrusage in the runner still gives per-process peaks
        psutil = None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                             start_new_session=True)
        peak = [0.0]
        stalled = [False]
        stop = threading.Event()

        def sample() -> None:
            root = None
            if psutil is not None:
                try:
                    root = psutil.Process(p.pid)
                except psutil.Error:
                    root = None
            started = time.time()
            while not stop.is_set():
                if root is not None:
                    total = 0
                    try:
                        procs = [root] + root.children(recursive=True)
                    except psutil.Error:
                        procs = []
                    for q in procs:
                        try:
                            total += q.memory_info().rss
                        except psutil.Error:
                            pass
                    peak[0] = max(peak[0], total / 2**20)
                if stall and progress is not None:
                    try:
                        last = progress.stat().st_mtime
                    except OSError:
                        last = started
                    if time.time() - last > stall:
                        stalled[0] = True
                        try:
                            os.killpg(p.pid, 9)
                        except OSError:
                            pass
                        return
                stop.wait(0.05)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        timed_out = False
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(p.pid, 9)  # the runner's own session: itself and its workers, nothing else
            rc = p.wait()
        stop.set()
        th.join()
    tail = log_path.read_bytes()[-3000:].decode(errors="replace")
    return Proc(rc, time.perf_counter() - t0, peak[0] if psutil else None, timed_out, stalled[0], tail)


def project_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def peer_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return env


# ----------------------------------------------------------------------------- peer venvs


def _probe(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], check=False,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    major, minor = out.stdout.split()
    return int(major), int(minor)


def find_python(want: tuple[int, int], exact: bool) -> str | None:
    """An interpreter of version ``want`` (or newer unless ``exact``): PATH, then pyenv's versions."""
    names = [f"python{want[0]}.{want[1]}"]
    if not exact:
        names += [f"python3.{m}" for m in range(want[1] + 1, 16)]
    cands: list[str] = []
    if exact and sys.version_info[:2] == want:
        cands.append(getattr(sys, "_base_executable", sys.executable))
    cands += [p for n in names if (p := shutil.which(n))]
    roots = [Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))]
    for r in roots:
        vers = sorted((r / "versions").glob("3.*"), key=lambda p: [int(x) if x.isdigit() else 0
                                                                    for x in p.name.split(".")], reverse=True)
        cands += [str(v / "bin" / "python") for v in vers if (v / "bin" / "python").exists()]
    found = [(c, v) for c in dict.fromkeys(cands) if (v := _probe(c))]
    for c, v in found:  # the version asked for first, a newer one only when it is missing
        if v == want:
            return c
    if not exact:
        newer = sorted((v, c) for c, v in found if v > want)
        if newer:
            return newer[0][1]
    return None


@dataclass
class Venv:
    name: str
    python: str | None = None
    reason: str | None = None  # why it is unavailable
    versions: dict = field(default_factory=dict)


def ensure_venv(name: str, venv_dir: Path, *, skip_create: bool) -> Venv:
    """Create ``venv_dir/venv-<name>`` when missing or broken (idempotent); log to venv-<name>.log."""
    path = venv_dir / f"venv-{name}"
    logf = venv_dir / f"venv-{name}.log"
    if name == "annbatch":
        want, exact, check = (3, 12), False, "import annbatch, zarrs, numba, psutil"
        pkgs = ["annbatch", "zarrs", "zarr", "anndata", "numba"]  # versions reported (pins are checked too)
    else:
        want, exact, check = (3, 11), True, "import tiledbsoma_ml, scdataset, torch, anndata, psutil"
        pkgs = ["tiledbsoma-ml", "tiledbsoma", "scdataset", "torch", "anndata"]
    py = path / "bin" / "python"
    vers_cmd = ("import importlib.metadata as m, json, sys; d={'python': sys.version.split()[0]}\n"
                f"for n in {pkgs!r}:\n    d[n]=m.version(n)\nprint(json.dumps(d))")

    def ready() -> dict | None:
        if not py.exists():
            return None
        r = subprocess.run([str(py), "-c", check + "\n" + vers_cmd], check=False, capture_output=True,
                           text=True, env=peer_env())
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None

    pins = ANNBATCH_PKGS if name == "annbatch" else [TORCH_PIN, *PEER_PKGS]
    pins = dict(x.split("==") for x in pins if "==" in x)
    pins = {k.split("[")[0]: v for k, v in pins.items()}

    def pinned(got: dict) -> bool:  # a venv made with other pins is made again
        return all(str(got.get(k) or "").split("+")[0] == v for k, v in pins.items())

    got = ready()
    if got and pinned(got):
        return Venv(name, str(py), None, got)
    if skip_create:
        return Venv(name, None, f"{path} is missing or broken and --no-venv-create was given")
    base = find_python(want, exact)
    if base is None:
        need = f"Python {want[0]}.{want[1]}" + ("" if exact else "+")
        return Venv(name, None, f"no {need} interpreter found (PATH or ~/.pyenv/versions)")
    log(f"creating {path} with {base} (log: {logf})")
    shutil.rmtree(path, ignore_errors=True)
    pip = [str(py), "-m", "pip", "install", "--progress-bar", "off"]
    steps = [[base, "-m", "venv", str(path)], pip + ["--upgrade", "pip"]]
    if name == "annbatch":
        steps.append(pip + ANNBATCH_PKGS)
    else:
        steps.append(pip + [TORCH_PIN])
        steps.append(pip + ["-c", str(ROOT / "constraints.txt")] + PEER_PKGS)
    with open(logf, "a") as lf:
        for i, cmd in enumerate(steps):
            lf.write(f"\n$ {' '.join(cmd)}\n")
            lf.flush()
            r = subprocess.run(cmd, check=False, stdout=lf, stderr=subprocess.STDOUT, env=peer_env())
            if r.returncode != 0 and "-c" in cmd:  # the project's pins do not resolve: without them
                cmd = [c for j, c in enumerate(cmd) if c != "-c" and (j == 0 or cmd[j - 1] != "-c")]
                lf.write(f"\n(constraints did not resolve; retrying without)\n$ {' '.join(cmd)}\n")
                lf.flush()
                r = subprocess.run(cmd, check=False, stdout=lf, stderr=subprocess.STDOUT, env=peer_env())
            if r.returncode != 0:
                tail = logf.read_text(errors="replace").strip().splitlines()[-1:]
                why = " ".join(tail)[:200]
                return Venv(name, None, f"`{' '.join(cmd[:6])} ...` failed: {why} (see {logf})")
    got = ready()
    if not got:
        return Venv(name, None, f"{path}: '{check}' fails after install (see {logf})")
    return Venv(name, str(py), None, got)


# ----------------------------------------------------------------------------- stores


def warm(paths: list[Path]) -> None:
    """Read every file under ``paths`` once, so the run starts with a warm page cache."""
    buf = bytearray(16 << 20)
    for p in paths:
        files = [p] if p.is_file() else [Path(d) / f for d, _, fs in os.walk(p) for f in fs]
        for f in files:
            try:
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass
            except OSError:
                pass


def _stamp_ok(stamp: Path, wanted: dict) -> bool:
    try:
        return json.loads(stamp.read_text()).get("params") == wanted
    except (OSError, json.JSONDecodeError):
        return False


def build_corpus(source: str, out: Path, *, fmt: str, jobs: int, timeout: float, skip_build: bool,
                 params: dict, extra: list[str] = ()) -> dict:
    """Our corpus via the real CLI; reused when built from the same inputs. Returns build info."""
    stamp = out.with_name(out.name + ".json")
    wanted = {"source": params, "format": fmt, **({"options": list(extra)} if extra else {})}
    if (out / "manifest.json").exists() and _stamp_ok(stamp, wanted):
        return json.loads(stamp.read_text())
    if skip_build:
        raise FileNotFoundError(f"{out}: no corpus built from these parameters (run without --skip-build)")
    cmd = [PROJECT_PY, "-m", "sharding", "build", "--source", source, "--out", str(out), "--format", fmt,
           "--jobs", str(jobs), "--no-progress", *extra]
    if (out / "manifest.json").exists():
        cmd.append("--overwrite")  # built from other inputs: rebuild
    log(f"building our corpus: {' '.join(cmd[2:])}")
    pr = run_sampled(cmd, log_path=out.with_name(out.name + ".build.log"), timeout=timeout, env=project_env())
    if pr.rc != 0:
        raise RuntimeError(f"sharding build failed (rc {pr.rc}): {pr.log_tail[-800:]}")
    m = json.loads((out / "manifest.json").read_text())
    info = {"params": wanted, "seconds": pr.seconds, "peak_tree_mb": pr.peak_tree_mb, "n_cells": m["n_cells"],
            "n_shards": len(m["zarr"]["shards"]) if m.get("zarr") else 0, "bytes": _du(out)}
    stamp.write_text(json.dumps(info, indent=1))
    return info


ANNBATCH_BUILD = {"n_obs_per_chunk": 64, "dataset_size": 65536, "shuffle_chunk_size": 1000}


def build_annbatch(python: str, h5ad: Path, store: Path, src: dict, runs_dir: Path, builds: dict,
                   a: argparse.Namespace) -> str | None:
    """annbatch's pre-shuffled collection (in its venv), reused when built from the same source.

    Returns None, or why it could not be built."""
    name = "annbatch collection (add_adatas, shuffle=True)"
    params = {"source": src["params"], **ANNBATCH_BUILD, "seed": a.seed, "annbatch": ANNBATCH_PKGS[0]}
    stamp = store.with_name(store.name + ".json")
    if store.exists() and _stamp_ok(stamp, params):
        builds[name] = json.loads(stamp.read_text())["build"]
        return None
    if a.skip_build:
        return f"{store} is missing or was built from other inputs (run without --skip-build)"
    shutil.rmtree(store, ignore_errors=True)
    log("building annbatch's collection")
    res_path = runs_dir / "annbatch-build.result.json"
    res_path.unlink(missing_ok=True)
    spec = {"mode": "build", "store": str(store), "h5ad": str(h5ad), "n_cells": src["n_cells"],
            **ANNBATCH_BUILD, "seed": a.seed, "result": str(res_path)}
    (runs_dir / "annbatch-build.spec.json").write_text(json.dumps(spec))
    warm([h5ad])
    pr = run_sampled([python, str(PEERS / "annbatch_run.py"), str(runs_dir / "annbatch-build.spec.json")],
                     log_path=runs_dir / "annbatch-build.log", timeout=a.build_timeout, env=peer_env())
    try:
        r = json.loads(res_path.read_text())
    except (OSError, json.JSONDecodeError):
        r = {"status": f"failed: rc {pr.rc}: {pr.log_tail.strip()[-300:]}"}
    if r.get("status") != "ok":
        builds[name] = {"status": r.get("status")}
        return f"its store could not be built: {r.get('status')}"
    b = {"seconds": r["seconds"], "cells": src["n_cells"], "peak_tree_mb": pr.peak_tree_mb,
         "bytes": _du(store), "status": "ok"}
    stamp.write_text(json.dumps({"params": params, "build": b}))
    builds[name] = b
    return None


def _du(p: Path) -> int:
    return sum((Path(d) / f).stat().st_size for d, _, fs in os.walk(p) for f in fs)


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


# ----------------------------------------------------------------------------- table


def _fmt_int(x) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _fmt_gb(mb) -> str:
    return "—" if mb is None else f"{mb / 1024:.2f} GB"


def _tree_mb(res: dict) -> float | None:
    """Peak RSS of the loader and its workers together: the sampled sum, but never below the main
    process's own high-water mark (a run shorter than the 50 ms sampling period is still right)."""
    vals = [v for v in (res.get("peak_tree_mb"), res.get("maxrss_self_mb")) if v]
    return max(vals) if vals else None


def _one_mb(res: dict) -> float | None:
    return max(res.get("maxrss_self_mb") or 0, res.get("maxrss_children_mb") or 0) or None


def table(rows: list[dict]) -> str:
    head = ("| loader | store | output | workers | cells | cells/s | first batch | peak RSS (all procs) "
            "| max RSS (one proc) | shuffle quality | status |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        res = r["result"]
        st = res.get("status", "?")
        ok = st.startswith("ok")
        q = res.get("shuffle_quality")
        one = _one_mb(res)
        lines.append("| " + " | ".join([
            r["loader"], r["store"], r["output"], r["workers"],
            _fmt_int(res.get("cells")) if ok else "—",
            f"**{res['cells_per_s']:,.0f}**" if ok and res.get("cells_per_s") else "—",
            f"{res['first_batch_s']:.2f} s" if ok and res.get("first_batch_s") is not None else "—",
            _fmt_gb(_tree_mb(res)) if ok else "—",
            _fmt_gb(one) if ok else "—",
            f"{q:.3f}" if (ok and q is not None) else "—",
            st.replace("|", "/")[:160],
        ]) + " |")
    return "\n".join(lines)


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
        if not (sorted_soma.exists() and _stamp_ok(stamp, src["params"])):
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
                "bytes": _du(sorted_soma), "status": "ok"}
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


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=False,
                             capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "data_loader", "sharding"], cwd=ROOT,
                               check=False, capture_output=True, text=True).stdout.strip()
        return rev.stdout.strip() + (" (data_loader/ or sharding/ modified)" if dirty else "")
    except OSError:
        return "?"


def _builds_table(builds: dict) -> list[str]:
    L = ["| store | seconds | cells/s | peak RSS | size on disk | status |", "|---|---|---|---|---|---|"]
    for name, b in builds.items():
        ok = str(b.get("status")).startswith("ok")
        secs = b.get("seconds") if ok else None
        rate = f"{b['cells'] / secs:,.0f}" if secs else "—"
        size = f"{(b.get('bytes') or 0) / 2**30:.2f} GB" if ok else "—"
        secs_s = f"{secs:,.1f}" if secs else "—"
        peak = _fmt_gb(b.get("peak_tree_mb"))
        L.append(f"| {name} | {secs_s} | {rate} | {peak} | {size} | {b.get('status')} |")
    return L


def _rss_table(a, rss_rows: list[dict]) -> list[str]:
    L = ["", (f"### Our loader's peak RSS vs corpus size ({a.rss_batches} batches of {a.batch_size:,} "
         "read from each)"), "",
         ("| backend | workers | corpus cells | peak RSS (all procs) | max RSS (one proc) | first batch "
         "| status |"),
         "|---|---|---|---|---|---|---|"]
    by: dict = {}
    for r in rss_rows:
        res = r["result"]
        first = f"{res['first_batch_s']:.2f} s" if res.get("first_batch_s") is not None else "—"
        L.append(f"| {r['backend']} | {r['workers']} | {r['corpus_cells']:,} | {_fmt_gb(_tree_mb(res))} "
                 f"| {_fmt_gb(_one_mb(res))} | {first} | {res.get('status')} |")
        if str(res.get("status")).startswith("ok"):
            by.setdefault((r["backend"], r["workers"]), []).append((r["corpus_cells"], _one_mb(res)))
    for (b, w), v in by.items():
        if len(v) >= 2:
            v.sort()
            L.append(f"\n{b}, {w} workers: max RSS x{v[-1][1] / v[0][1]:.2f} from {v[0][0]:,} to "
                     f"{v[-1][0]:,} cells (target: <= 1.10)")
    return L


def report(a, src, measure, rows, builds, rss_rows, venvs, profiles, total_s) -> str:
    import platform

    L = [(f"## Loader benchmark: {src['n_cells']:,} cells x {src['n_genes']:,} genes, "
         f"{src['nnz_per_cell']:,.0f} nnz/cell, stored sorted by cell type; batch {a.batch_size:,}"),
         "",
         (f"Machine: {os.cpu_count()} cores, {platform.platform()}. Warm page cache (each store read once "
         f"before its run); each loader in its own process, warmed up on a throw-away instance; "
         f"{measure:,} cells timed per loader (one pass)."),
         f"Commit {_git_rev()}; {time.strftime('%Y-%m-%d %H:%M')}; whole benchmark {total_s / 60:.1f} min.",
         "", table(rows), "",
         ("cells/s: cells delivered / seconds from asking for the first batch to receiving the last (the "
         "pass's start-up, e.g. DataLoader workers, and its first fetch included). peak RSS (all procs): "
         "the loader process and its workers together (sampled). max RSS (one proc): kernel high-water "
         "mark of the largest single process. shuffle quality: mean batch label entropy / entropy of a "
         "random batch of the same size (1.0 = perfect)."), "",
         "### Store builds", ""]
    L += _builds_table(builds)
    if rss_rows:
        L += _rss_table(a, rss_rows)
    L += ["", "### Versions", ""]
    ours = next((r["result"].get("versions") for r in rows
                 if r["group"] == "ours" and r["result"].get("versions")), None)
    L.append(f"- ours: scpretrain {_git_rev()}" + ("; " + ", ".join(f"{k} {v}" for k, v in ours.items())
                                                    if ours else ""))
    for name, v in venvs.items():
        L.append(f"- venv-{name}: " + (", ".join(f"{k} {x}" for k, x in v.versions.items()) if v.python
                                       else f"unavailable: {v.reason}"))
    ceil = next((r["result"].get("versions") for r in rows if r["group"] == "ceilings"
                 and r["result"].get("versions")), None)
    if ceil:
        L.append("- ceilings (project venv): " + ", ".join(f"{k} {x}" for k, x in ceil.items()))
    for backend, txt in profiles.items():
        body = [ln for ln in txt.strip().splitlines() if ".prof" not in ln]
        L += ["", f"### cProfile: our loader ({backend}), 0 workers, read-ahead off, top 15 by own time", "",
              (f"Full listing: profile_ours_{backend}_w0.txt. Under the profiler numba-compiled calls look "
              "several times slower than they run."), "", "```", "\n".join(body[:40]), "```"]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
