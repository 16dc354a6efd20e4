"""The loader benchmark's processes and environments: each loader run in its own process with its RSS
sampled (``run_sampled``), and the peers' virtual environments made when missing (``ensure_venv``: annbatch
needs Python >= 3.12, tiledbsoma-ml and scDataset their own pins), never touching the project's .venv.
Used by ``benchmarks.bench_loader`` and ``benchmarks.bench_corpus``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"  # the peers' runner scripts
ANNBATCH_PKGS = ["annbatch[zarrs,numba]==0.3.1", "zarrs==0.2.3", "psutil"]
PEER_PKGS = ["tiledbsoma-ml==0.1.0", "scdataset==0.3.0", "psutil"]
TORCH_PIN = "torch==2.13.0"  # as in the Makefile: a local CPU build; unpinned would pull CUDA wheels


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


