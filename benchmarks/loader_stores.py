"""The loader benchmark's stores, built once and reused while their inputs are the same (a stamp beside each):
our corpus (``python -m sharding build``) and annbatch's pre-shuffled collection (in its own venv); ``warm``
reads a store once so every loader starts from a warm page cache."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from benchmarks.peer_envs import ANNBATCH_PKGS, PEERS, log, peer_env, project_env, run_sampled

PROJECT_PY = sys.executable


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


def stamp_ok(stamp: Path, wanted: dict) -> bool:
    try:
        return json.loads(stamp.read_text()).get("params") == wanted
    except (OSError, json.JSONDecodeError):
        return False


def build_corpus(source: str, out: Path, *, fmt: str, jobs: int, timeout: float, skip_build: bool,
                 params: dict, extra: list[str] = ()) -> dict:
    """Our corpus via the real CLI; reused when built from the same inputs. Returns build info."""
    stamp = out.with_name(out.name + ".json")
    wanted = {"source": params, "format": fmt, **({"options": list(extra)} if extra else {})}
    if (out / "manifest.json").exists() and stamp_ok(stamp, wanted):
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
            "n_shards": len(m["zarr"]["shards"]) if m.get("zarr") else 0, "bytes": tree_bytes(out)}
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
    if store.exists() and stamp_ok(stamp, params):
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
         "bytes": tree_bytes(store), "status": "ok"}
    stamp.write_text(json.dumps({"params": params, "build": b}))
    builds[name] = b
    return None


def tree_bytes(p: Path) -> int:
    return sum((Path(d) / f).stat().st_size for d, _, fs in os.walk(p) for f in fs)
