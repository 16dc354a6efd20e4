"""Shared fixtures: a small real corpus built by the real CLI, CPU DeepSpeed, clean process groups."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def run_cli(args: list[str], timeout: int = 600, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", **(env or {})}
    # own session: on timeout the whole tree (torchrun and its workers) is killed, no orphans
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{args} timed out after {timeout} s\nstdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}")
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """3,000 synthetic cells x 300 genes, 3 datasets, 5 types; Zarr shards + SOMA."""
    out = tmp_path_factory.mktemp("corpus") / "small"
    run_cli(["-m", "sharding", "build", "--source", "synthetic://cells=3000,genes=300,types=5,datasets=3,seed=0",
             "--out", str(out), "--format", "both", "--cells-per-shard", "1000"])
    return out


@pytest.fixture(autouse=True)
def _no_process_group_leak():
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
