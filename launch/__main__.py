"""Start pretraining processes: torchrun (one node or many, c10d rendezvous), the deepspeed
launcher with a hostfile, or SLURM. ``--dry-run`` prints the resolved plan and the command.

    python -m launch --config configs/pretrain/demo_mae.yaml --nproc-per-node 2
    python -m launch --config configs/pretrain/demo_mae.yaml model.preset=mae_base corpus=corpora/lung \\
        --nnodes 4 --nproc-per-node 8 --rdzv-endpoint head:29400 --dry-run
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path


def plan(cfg, world_size: int, gpu_mem_gib: float = 80.0) -> dict:
    """Batch arithmetic, FLOPs per cell and a per-rank memory estimate: weights, grads and Adam states
    by ZeRO stage, activations per cell (measured on a probe, ``train.flops``), and the largest per-rank
    batch that fits 90% of ``gpu_mem_gib``."""
    if world_size < 1:
        raise ValueError(f"world size {world_size}: pass --nnodes and --nproc-per-node of at least 1")
    from scpretrain.scmodels.build import build_model
    from scpretrain.sharding.manifest import read_vocab
    from scpretrain.train.config import resolve_model_params

    try:
        n_genes = len(read_vocab(cfg.data.corpus))
    except Exception:  # noqa: BLE001 - a dry run must work before the corpus exists
        n_genes = 19331 if cfg.model.family == "mae" else 16906
    params = {**resolve_model_params(cfg.model), "n_genes": n_genes}
    model = build_model(cfg.model.family, params)
    n_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stage, W = cfg.engine.zero_stage, world_size
    weights = 4 * n_params / (W if stage >= 3 else 1)
    grads = 4 * trainable / (W if stage >= 2 else 1)
    adam = 8 * trainable / (W if stage >= 1 else 1)
    if cfg.engine.offload_optimizer:
        adam = 0.0
    micro = cfg.data.batch_size
    from scpretrain.train.flops import activation_bytes_per_cell, flops_per_cell

    # activations: measured per cell in fp32 (train.flops), about half in bf16 (precision auto = bf16 on GPUs)
    act = activation_bytes_per_cell(cfg.model.family, params, cfg.model.checkpoint_layers)
    act *= 1.0 if cfg.engine.precision == "fp32" else 0.5
    inputs = n_genes * 4 * 3
    state = weights + grads + adam
    fits = int((0.9 * gpu_mem_gib * 2**30 - state) // (act + inputs))
    return {
        "world_size": W, "per_rank_batch": micro, "grad_accum": cfg.engine.grad_accum,
        "global_batch": micro * cfg.engine.grad_accum * W, "zero_stage": stage,
        "offload_optimizer": cfg.engine.offload_optimizer, "model": cfg.model.family, "n_genes": n_genes,
        "parameters": n_params, "trainable": trainable,
        "train_gflops_per_cell": round(flops_per_cell(cfg.model.family, params, cfg.objective).train / 1e9, 3),
        "checkpoint_layers": cfg.model.checkpoint_layers,
        "est_activation_mib_per_cell": round(act / 2**20, 2),
        "est_state_gib_per_rank": round(state / 2**30, 3),
        "est_input_gib_per_rank": round(micro * inputs / 2**30, 3),
        "est_gib_per_rank": round((state + micro * (act + inputs)) / 2**30, 2),
        f"largest_batch_per_rank_{gpu_mem_gib:g}gib": max(fits, 0),
    }


def torchrun_cmd(a: argparse.Namespace, train_args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={a.nproc_per_node}",
           f"--nnodes={a.nnodes}", f"--max-restarts={a.max_restarts}"]
    if a.nnodes == 1 and not a.rdzv_endpoint:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={a.rdzv_endpoint}", f"--rdzv-id={a.rdzv_id}"]
    return cmd + ["-m", "scpretrain.train", "pretrain", *train_args]


def deepspeed_cmd(a: argparse.Namespace, train_args: list[str]) -> list[str]:
    local = os.path.join(os.path.dirname(sys.executable), "deepspeed")  # the venv's launcher
    cmd = [local if os.path.exists(local) else "deepspeed", f"--num_gpus={a.nproc_per_node}"]
    if a.hostfile:
        cmd += [f"--hostfile={a.hostfile}"]
    return cmd + ["--module", "scpretrain.train", "pretrain", *train_args]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="key=value config overrides (corpus=DIR, optim.lr=...)")
    p.add_argument("--launcher", choices=["torchrun", "deepspeed"], default="torchrun")
    p.add_argument("--nproc-per-node", type=int, default=None, help="default: GPUs on this node, else 2 on CPU")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--rdzv-endpoint", default=None, help="host:port of the c10d rendezvous (several nodes)")
    p.add_argument("--rdzv-id", default="scpretrain")
    p.add_argument("--max-restarts", type=int, default=0)
    p.add_argument("--hostfile", default=None, help="deepspeed launcher hostfile (see launch/hostfile.example)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the command, run nothing")
    p.add_argument("--gpu-mem-gib", type=float, default=None,
                   help="GPU memory for the plan's largest-batch estimate (default: this GPU's, else 80)")
    a = p.parse_args(argv)
    import torch

    from scpretrain.train.config import ConfigError, load_config

    if a.nproc_per_node is None or a.nproc_per_node == 0:  # 0: what SLURM says on nodes without GPU GRES
        a.nproc_per_node = torch.cuda.device_count() or 2
    if a.nproc_per_node < 0:
        p.error(f"--nproc-per-node {a.nproc_per_node}: pass a positive number of processes per node")
    if a.nnodes > 1 and not a.rdzv_endpoint:
        p.error("--nnodes > 1 needs --rdzv-endpoint host:port")
    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train_args = ["--config", a.config, *a.overrides]
    cmd = torchrun_cmd(a, train_args) if a.launcher == "torchrun" else deepspeed_cmd(a, train_args)
    world = a.nproc_per_node * a.nnodes
    mem = a.gpu_mem_gib or (torch.cuda.get_device_properties(0).total_memory / 2**30
                            if torch.cuda.is_available() else 80.0)
    info = plan(cfg, world, mem)
    print("plan: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    print("command: " + shlex.join(cmd), flush=True)
    if a.dry_run:
        return 0
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return run_forwarding_signals(cmd, env, cfg.run_dir / PREEMPTED_FILE)


PREEMPTED_FILE = "preempted.json"


def _ignore_warning_signals() -> None:
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def run_forwarding_signals(cmd: list[str], env: dict, marker: Path, grace: float = 600.0) -> int:
    """Run the launcher; the first SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 to this process becomes one SIGTERM to it.

    torchrun's agent passes SIGTERM on to every worker (and waits for them); a warning signal
    such as SLURM's ``--signal=USR1@180`` would kill the agent outright, so it is turned into
    SIGTERM here, once (a second SIGTERM can make the agent give up waiting). Workers still
    running when the agent exits (it may, when the scheduler signals it directly too) are waited
    for, up to ``grace`` seconds, so that this process, which the scheduler tracks, outlives their
    save. Returns 75 (EXIT_PREEMPTED) when the run wrote its preemption marker after this launch
    started, else the launcher's exit code.
    """
    import time

    import psutil

    from scpretrain.train.preempt import EXIT_PREEMPTED

    started = time.time()
    # the scheduler may signal every process of the job step, torchrun's agent included: a SIGUSR1/2 there
    # would kill it (no handler), so the agent starts with them ignored; the workers install their own
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_ignore_warning_signals)
    forwarded: list[psutil.Process] = []

    def forward(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if forwarded:
            print(f"[launch] {name}: a checkpoint is already being taken", flush=True)
            return
        print(f"[launch] {name}: asking the workers to checkpoint and stop", flush=True)
        try:
            forwarded.extend(psutil.Process(proc.pid).children(recursive=True))
        except psutil.Error:
            pass
        forwarded.append(psutil.Process(os.getpid()))  # marks "forwarded" even if the list is empty
        proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    rc = proc.wait()
    workers = [p for p in forwarded if p.pid != os.getpid()]
    if workers:
        psutil.wait_procs(workers, timeout=grace)
    if marker.exists() and marker.stat().st_mtime >= started:
        return EXIT_PREEMPTED
    return rc

if __name__ == "__main__":
    sys.exit(main())
