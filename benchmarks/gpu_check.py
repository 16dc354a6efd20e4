"""The prepared device check: one command on a single-GPU machine with no package index.

    bash benchmarks/gpu_check.sh --out $OUT            # on the GPU machine (installs .whl/ if carried)
    bash benchmarks/gpu_check.sh --cpu-dry-run --out /tmp/gc   # here: the same stages, tiny presets, CPU

Stages, each writing ``<out>/stageN_*.json`` as soon as it finishes (a timeout keeps what ran):

0. ``stage0_env.json``: Python, torch, CUDA, device, and the versions of the packages the run needs.
1. ``stage1_peak.json``: a bf16 matrix-product probe (8192^3, mean of 10 after 3 warm-ups), TFLOP/s.
2. ``stage2_model.json``: model-only training steps, no DeepSpeed and no loader in the loop: real
   loader batches staged on the GPU once, then per step the real ``model_inputs`` (CSR -> dense on
   the GPU) + the family's objective + AdamW, bf16 autocast, synchronized timing. cells/s and MFU
   against the measured peak and the datasheet's (H100/H200 SXM 989 TFLOP/s dense bf16). ``mae_base``
   on 19,331 genes, ``scbert_base`` on scBERT's 16,906 with ``checkpoint_layers``.
3. ``stage3_loader.json``: the loader's feed rate (cells/s into GPU inputs) at 0/4/8/12 workers.
4. ``stage4_e2e.json``: ``torchrun -m train pretrain`` with DeepSpeed ZeRO-2, both presets, cells/s
   from the run's own wall clock between logged steps (after a warm-up, within one epoch), MFU and
   the data-stall fraction.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def _write(out: Path, name: str, obj: dict) -> dict:
    (out / name).write_text(json.dumps(obj, indent=2))
    print(f"[gpu_check] {name}: {json.dumps(obj)[:600]}", flush=True)
    return obj


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def stage0(out: Path) -> dict:
    import importlib

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "gpu_mem_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            if torch.cuda.is_available() else None}
    for mod in ("deepspeed", "performer_pytorch", "zarr", "numcodecs", "numpy", "pandas", "yaml", "safetensors"):
        try:
            m = importlib.import_module(mod)
            info[mod] = getattr(m, "__version__", "present")
        except Exception as e:  # noqa: BLE001 - record what is missing, go on
            info[mod] = f"MISSING: {e!r}"
    return _write(out, "stage0_env.json", info)


def stage1(out: Path, dry: bool) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(device)
    dt = (time.perf_counter() - t) / 10
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    return _write(out, "stage1_peak.json", {"device": name, "n": n, "dtype": str(dtype),
                                            "tflops": 2 * n**3 / dt / 1e12,
                                            "datasheet_tflops": sheet / 1e12 if sheet else None})


def corpus(out: Path, genes: int, cells: int) -> Path:
    path = out / "corpora" / f"c{cells}x{genes}"
    if not (path / "manifest.json").exists():
        density = min(0.08, 1500 / genes)
        subprocess.run([sys.executable, "-m", "sharding", "build", "--source",
                        f"synthetic://cells={cells},genes={genes},types=20,datasets=4,seed=0,density={density:.4f}",
                        "--out", str(path), "--format", "zarr", "--overwrite", "--cells-per-shard", "25000"],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return path


def stage2(out: Path, presets: list[tuple[str, Path, int]], steps: int, peak: float | None,
           sheet: float | None, dry: bool) -> dict:
    import torch

    from scpretrain.data_loader.collate import model_inputs
    from scpretrain.data_loader.stream import StreamingLoader
    from scpretrain.scmodels.build import default_preprocessing
    from scpretrain.sharding.manifest import read_vocab
    from scpretrain.train import objectives
    from scpretrain.train.config import load_config
    from scpretrain.train.flops import flops_per_cell
    from scpretrain.train.trainer import build_model_for

    cuda = torch.cuda.is_available() and not dry
    device = torch.device("cuda" if cuda else "cpu")
    rows = {}
    for preset, corpus_dir, batch in presets:
        family = "performer" if preset.startswith("scbert") else "mae"
        cfg = load_config(None, [f"model.family={family}", f"model.preset={preset}", f"corpus={corpus_dir}",
                                 f"data.batch_size={batch}", f"model.checkpoint_layers={family == 'performer'}"])
        vocab = read_vocab(corpus_dir)
        model = build_model_for(cfg, len(vocab), vocab).to(device).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        spec = default_preprocessing(family)
        loader = StreamingLoader(corpus_dir, batch_size=batch, seed=0, num_workers=0)
        staged = []
        for b in loader:  # real batches, staged on the device once
            staged.append({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()})
            if len(staged) == 4:
                break
        gen = torch.Generator(device=device).manual_seed(0)
        fl = flops_per_cell(family, {**vars(model.cfg)}, cfg.objective)
        try:
            times = []
            for i in range(steps + 3):
                _sync(device)
                t = time.perf_counter()
                inputs = model_inputs(staged[i % len(staged)], len(vocab), spec, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    loss, _ = objectives.objective_step(model, cfg, inputs, gen)
                loss.float().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                _sync(device)
                if i >= 3:
                    times.append(time.perf_counter() - t)
            cps = batch / statistics.median(times)
            rows[preset] = {"genes": len(vocab), "batch": batch, "cells_per_s": cps, "loss": float(loss),
                            "train_flops_per_cell": fl.train,
                            "mfu_measured_peak": cps * fl.train / peak if peak else None,
                            "mfu_datasheet": cps * fl.train / sheet if sheet else None,
                            "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        except torch.OutOfMemoryError as e:
            rows[preset] = {"genes": len(vocab), "batch": batch, "error": f"out of memory: {e}"[:300]}
        del model, opt, staged
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _write(out, "stage2_model.json", rows)  # after each preset: a timeout keeps the first
    return rows


def stage3(out: Path, corpus_dir: Path, workers: list[int], batch: int, batches: int, dry: bool) -> dict:
    import torch

    from scpretrain.data_loader.collate import model_inputs
    from scpretrain.data_loader.stream import StreamingLoader
    from scpretrain.scmodels.build import default_preprocessing
    from scpretrain.sharding.manifest import read_vocab

    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    n_genes, spec = len(read_vocab(corpus_dir)), default_preprocessing("mae")
    rows = {}
    for w in workers:
        loader = StreamingLoader(corpus_dir, batch_size=batch, seed=0, num_workers=w)
        n, t = 0, None
        for i, b in enumerate(loader):
            model_inputs(b, n_genes, spec, device)
            if i == 1:  # workers started, first batches out
                _sync(device)
                t = time.perf_counter()
            elif i > 1:
                n += len(b["cell_id"])
            if i == batches + 1:
                break
        _sync(device)
        rows[str(w)] = {"cells_per_s": n / (time.perf_counter() - t) if t and n else None, "batches": batches}
        _write(out, "stage3_loader.json", rows)
    return rows


def stage4(out: Path, presets: list[tuple[str, Path, int]], steps: int, nproc: int, peak: float | None,
           dry: bool) -> dict:
    import torch

    from scpretrain.sharding.manifest import read_vocab
    from scpretrain.train.config import load_config, resolve_model_params
    from scpretrain.train.flops import flops_per_cell

    cuda = torch.cuda.is_available() and not dry
    rows = {}
    for preset, corpus_dir, batch in presets:
        family = "performer" if preset.startswith("scbert") else "mae"
        name = f"e2e_{preset}"
        run_dir = out / "runs" / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "train", "pretrain", "--config", f"configs/pretrain/demo_{family}.yaml",
               f"corpus={corpus_dir}", f"out_dir={out / 'runs'}", f"name={name}", f"max_steps={steps}",
               f"model.preset={preset}", "engine.zero_stage=2", f"engine.precision={'bf16' if cuda else 'fp32'}",
               f"data.batch_size={batch}", "data.backend=zarr", f"data.num_workers={4 if cuda else 0}",
               f"model.checkpoint_layers={family == 'performer'}", "export=false", "tracking.mlflow=false",
               "checkpoint.every_steps=1000000", "tracking.log_every=1", "tracking.progress=false",
               "checkpoint.resume=never", "checkpoint.allow_fresh_start=true", "model.gene_embedding=null"]
        env = {**os.environ, **({} if cuda else {"DS_ACCELERATOR": "cpu"})}
        t = time.time()
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            rows[preset] = {"error": f"exit {p.returncode}", "tail": (p.stdout + p.stderr)[-3000:]}
            _write(out, "stage4_e2e.json", rows)
            continue
        rs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        warm = max(1, len(rs) // 4)
        a, b = rs[warm - 1], rs[-1]
        cps = (b["cells_seen"] - a["cells_seen"]) / (b["wall_s"] - a["wall_s"]) / nproc
        hp = {**resolve_model_params(load_config(None, [f"model.family={family}", f"model.preset={preset}"]).model),
              "n_genes": len(read_vocab(corpus_dir))}
        fl = flops_per_cell(family, hp)  # the preset's hyperparameters; no model needs building
        rows[preset] = {"cells_per_s_per_gpu": cps, "mfu": cps * fl.train / peak if peak else None,
                        "data_stall": statistics.mean(r["data_stall_frac"] for r in rs[warm:]),
                        "epochs": sorted({r["epoch"] for r in rs}), "steps": len(rs), "wall_s": time.time() - t,
                        "final_loss": rs[-1]["loss"]}
        _write(out, "stage4_e2e.json", rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/gpu_check")
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny presets on the CPU: the script cannot rot")
    p.add_argument("--stages", default="0,1,2,3,4")
    a = p.parse_args(argv)
    dry = a.cpu_dry_run
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = {int(s) for s in a.stages.split(",")}
    t0 = time.time()
    if 0 in stages:
        stage0(out)
    peak = sheet = None
    if 1 in stages:
        r = stage1(out, dry)
        peak = r["tflops"] * 1e12 if not dry else None
        sheet = r["datasheet_tflops"] * 1e12 if r["datasheet_tflops"] else None
    if dry:
        mae_c, perf_c = corpus(out, 400, 3000), corpus(out, 300, 3000)
        presets2 = [("mae_tiny", mae_c, 256), ("scbert_tiny", perf_c, 8)]
        presets4 = [("mae_tiny", mae_c, 64), ("scbert_tiny", perf_c, 4)]
        steps2, steps4, nproc, workers, fb = 3, 6, 2, [0, 1], 4
    else:
        mae_c, perf_c = corpus(out, 19331, 200_000), corpus(out, 16906, 20_000)
        presets2 = [("mae_base", mae_c, 8192), ("scbert_base", perf_c, 32)]
        presets4 = [("mae_base", mae_c, 4096), ("scbert_base", perf_c, 16)]
        steps2, steps4, workers, fb = 20, 40, [0, 4, 8, 12], 40
        import torch

        nproc = max(torch.cuda.device_count(), 1)
    if 2 in stages:
        stage2(out, presets2, steps2, peak, sheet, dry)
    if 3 in stages:
        stage3(out, mae_c, workers, 256 if dry else 4096, fb, dry)
    if 4 in stages:
        stage4(out, presets4, steps4, nproc, peak if not dry else None, dry)
    print(f"[gpu_check] done in {time.time() - t0:.0f} s; results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
