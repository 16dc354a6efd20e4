"""launch/: dry runs print the plan; two torchrun agents on one machine join by c10d rendezvous."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_cli
from tests.dist.test_pretrain_dist import base, metrics

pytestmark = pytest.mark.dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dry_run_prints_plan_and_command(small_corpus):
    p = run_cli(["-m", "launch", "--config", "configs/pretrain/demo_mae.yaml", f"corpus={small_corpus}",
                 "engine.grad_accum=4", "--nnodes", "4", "--nproc-per-node", "8",
                 "--rdzv-endpoint", "head:29400", "--dry-run"])
    assert "world_size=32" in p.stdout and "per_rank_batch=256" in p.stdout and "grad_accum=4" in p.stdout
    assert "global_batch=32768" in p.stdout and "zero_stage=2" in p.stdout and "est_state_gib_per_rank=" in p.stdout
    assert "--rdzv-backend=c10d" in p.stdout and "--rdzv-endpoint=head:29400" in p.stdout


def test_dry_run_deepspeed_launcher_and_bad_key():
    p = run_cli(["-m", "launch", "--config", "configs/pretrain/demo_mae.yaml", "--launcher", "deepspeed",
                 "--hostfile", "launch/hostfile.example", "--nproc-per-node", "8", "--dry-run"])
    assert "deepspeed --num_gpus=8 --hostfile=launch/hostfile.example --module scpretrain.train pretrain" in p.stdout
    bad = run_cli(["-m", "launch", "--config", "configs/pretrain/demo_mae.yaml", "optim.lrate=1", "--dry-run"], check=False)
    assert bad.returncode == 2 and "optim.lrate: unknown key" in bad.stderr


def test_train_accepts_deepspeed_launcher_local_rank(tmp_path, small_corpus):
    """The deepspeed launcher appends --local_rank=N; a world of one runs with it."""
    p = run_cli(["-m", "train", "--local_rank=0", "pretrain", "--config", "configs/pretrain/demo_mae.yaml",
                 *base(tmp_path, small_corpus, "ds1", 2)], env={"MASTER_PORT": str(free_port())})
    assert "world size 1" in p.stdout + p.stderr


def test_two_agents_rendezvous_over_c10d(tmp_path, small_corpus):
    """Two torchrun agents (1 process each) on 127.0.0.1 form one world of 2 via c10d."""
    port = free_port()
    cmd = [sys.executable, "-m", "launch", "--config", "configs/pretrain/demo_mae.yaml",
           *base(tmp_path, small_corpus, "twonode", 4), "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"t{port}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "world size 2" in "".join(outs)
    rows = metrics(tmp_path / "runs" / "twonode")
    assert rows[-1]["step"] == 4 and rows[-1]["cells_seen"] == 4 * 32 * 2
    assert json.loads((tmp_path / "runs" / "twonode" / "deepspeed_config.json").read_text())["train_batch_size"] == 64


def test_dry_run_estimates_performer_memory_and_checkpointing_shrinks_it():
    """scbert_base at 16,906 genes: FLOPs and activation memory per cell, and the batch that fits 80 GiB."""
    def plan(*extra):
        p = run_cli(["-m", "launch", "--config", "configs/pretrain/demo_performer.yaml", "corpus=/nonexistent",
                     "model.preset=scbert_base", "engine.precision=bf16", *extra, "--gpu-mem-gib", "80", "--dry-run"])
        line = next(ln for ln in p.stdout.splitlines() if ln.startswith("plan: "))
        return dict(kv.split("=", 1) for kv in line[len("plan: "):].split(", "))

    full, ckpt = plan(), plan("model.checkpoint_layers=true")
    assert full["n_genes"] == "16906" and float(full["train_gflops_per_cell"]) > 100
    assert float(ckpt["est_activation_mib_per_cell"]) < float(full["est_activation_mib_per_cell"]) / 3
    assert int(ckpt["largest_batch_per_rank_80gib"]) > 3 * int(full["largest_batch_per_rank_80gib"]) >= 0
