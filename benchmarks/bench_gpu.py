"""Training throughput per device and MFU for both encoder families, with the real loader.

    python -m benchmarks.bench_gpu                 # GPUs: mae_base + scbert_base, bf16, ZeRO-2
    python -m benchmarks.bench_gpu --steps 30      # CPU: the tiny presets, fp32 (so it cannot rot)

Each preset runs as a real job (`torchrun -m train pretrain`, DeepSpeed ZeRO-2, streaming the
corpus's Zarr shards); the figures come from its metrics.jsonl after a warm-up: cells/s per device,
MFU = cells/s x analytic train FLOPs per cell (train/flops.py) / the device's peak, and the
data-stall fraction (time waiting for the loader / step time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# dense bf16 peak FLOP/s by device name fragment (vendor datasheets)
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(cuda: bool) -> tuple[float | None, str]:
    import torch

    if not cuda:
        return None, "cpu"
    name = torch.cuda.get_device_name(0)
    for k, v in PEAKS.items():
        if k in name:
            return v, name
    return None, name


def ensure_corpus(out: Path, genes: int, cells: int) -> Path:
    corpus = out / f"corpus_{cells}x{genes}"
    if not (corpus / "manifest.json").exists():
        density = min(0.08, 1500 / genes)
        subprocess.run([sys.executable, "-m", "sharding", "build", "--source",
                        f"synthetic://cells={cells},genes={genes},types=20,datasets=4,seed=0,density={density:.4f}",
                        "--out", str(corpus), "--format", "zarr", "--overwrite"], cwd=REPO, check=True)
    return corpus


def run_preset(preset: str, family: str, corpus: Path, out: Path, nproc: int, steps: int, batch: int,
               cuda: bool) -> dict:
    name = f"bench_{preset}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "train", "pretrain", "--config", "configs/pretrain/demo_mae.yaml",
           f"corpus={corpus}", f"out_dir={out / 'runs'}", f"name={name}", f"max_steps={steps}",
           f"model.family={family}", f"model.preset={preset}", "engine.zero_stage=2",
           f"engine.precision={'bf16' if cuda else 'fp32'}", f"data.batch_size={batch}", "data.backend=zarr",
           "export=false", "checkpoint.every_steps=1000000", "tracking.log_every=1", "tracking.progress=false",
           "checkpoint.allow_fresh_start=true", "checkpoint.resume=never", "tracking.system_metrics=false"]
    env = {**os.environ}
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    run_dir = out / "runs" / name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t = time.time()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    warm = rows[max(1, len(rows) // 5):]
    return {"preset": preset, "wall_s": time.time() - t,
            "cells_per_s": statistics.median(r["cells_per_s"] for r in warm) / nproc,
            "stall": statistics.mean(r["data_stall_frac"] for r in warm), "steps": len(rows)}


def main(argv: list[str] | None = None) -> int:
    import torch

    from scmodels.build import build_model
    from sharding.manifest import read_vocab
    from train.config import load_config, resolve_model_params
    from train.flops import flops_per_cell

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/gpu")
    p.add_argument("--steps", type=int, default=60 if cuda else 20)
    p.add_argument("--nproc", type=int, default=torch.cuda.device_count() if cuda else 2)
    p.add_argument("--genes", type=int, default=19331 if cuda else 2000)
    p.add_argument("--cells", type=int, default=400_000 if cuda else 20_000)
    p.add_argument("--presets", default="mae_base,scbert_base" if cuda else "mae_tiny,scbert_tiny")
    p.add_argument("--mae-batch", type=int, default=8192 if cuda else 256)
    p.add_argument("--performer-batch", type=int, default=4 if cuda else 4)
    a = p.parse_args(argv)
    out = Path(a.out)
    corpus = ensure_corpus(out, a.genes, a.cells)
    n_genes = len(read_vocab(corpus))
    peak, device = peak_flops(cuda)
    rows = []
    for preset in a.presets.split(","):
        family = "performer" if preset.startswith("scbert") else "mae"
        cfg = load_config(None, [f"model.family={family}", f"model.preset={preset}"])
        hp = {**resolve_model_params(cfg.model), "n_genes": n_genes}
        hp = {k: v for k, v in vars(build_model(family, hp).cfg).items()}
        fl = flops_per_cell(family, hp, cfg.objective)
        r = run_preset(preset, family, corpus, out, a.nproc, a.steps,
                       a.performer_batch if family == "performer" else a.mae_batch, cuda)
        r["train_flops_per_cell"] = fl.train
        r["mfu"] = r["cells_per_s"] * fl.train / peak if peak else None
        rows.append(r)
    print(f"\n{device}, {a.nproc} process(es), {n_genes} genes, ZeRO-2, {'bf16' if cuda else 'fp32'}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| preset | cells/s per device | train FLOPs/cell | MFU | data stall | steps |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (CPU)"
        print(f"| {r['preset']} | {r['cells_per_s']:,.0f} | {r['train_flops_per_cell']:.3g} | {mfu} | "
              f"{100 * r['stall']:.1f}% | {r['steps']} |")
    (out / "results.json").write_text(json.dumps({"device": device, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
