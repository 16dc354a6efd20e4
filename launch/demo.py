"""``make demo``: build a corpus, pretrain both encoders under torchrun + DeepSpeed ZeRO-2,
export them, annotate real PBMC cells, and print where everything is.

Every stage runs through the same command lines a user runs (``python -m sharding build``,
``python -m launch``, ``python -m evaluate report``), so the demo is the user journey.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def run(cmd: list[str], env: dict | None = None) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    t = time.time()
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    if rc != 0:
        sys.exit(f"demo: step failed with exit code {rc}: {shlex.join(cmd)}")
    print(f"  ({time.time() - t:.0f} s)", flush=True)


def pbmc_counts_h5ad(path: Path) -> None:
    """pbmc68k_reduced (700 real Zheng68K cells, 765 genes) with integer counts recovered.

    Its ``.raw`` holds log1p of normalized values. We invert log1p and divide each cell by its
    smallest non-zero value (a gene seen once), then round: integer counts up to a per-cell
    scale (max rounding error observed 0.11). Labels: ``bulk_labels`` -> ``cell_type``.
    """
    import anndata as ad
    import numpy as np
    import scanpy as sc
    import scipy.sparse as sp

    a = sc.datasets.pbmc68k_reduced()
    x = a.raw.X.toarray() if sp.issparse(a.raw.X) else np.asarray(a.raw.X)
    x = np.expm1(x.astype(np.float64))
    smallest = np.where(x > 0, x, np.inf).min(axis=1, keepdims=True)
    counts = np.rint(x / smallest).astype(np.float32)
    obs = a.obs[["bulk_labels"]].rename(columns={"bulk_labels": "cell_type"}).copy()
    obs["cell_type"] = obs["cell_type"].astype(str)
    obs["dataset_id"] = "pbmc68k_reduced"
    out = ad.AnnData(sp.csr_matrix(counts), obs=obs, var=a.raw.var[[]].copy())
    path.parent.mkdir(parents=True, exist_ok=True)
    out.write_h5ad(path)


def demo_vocab(pbmc: Path, path: Path, n_genes: int) -> None:
    """The demo's vocabulary: the PBMC genes, padded with synthetic genes to ``n_genes``."""
    import anndata as ad

    genes = list(ad.read_h5ad(pbmc, backed="r").var_names)
    genes += [f"SYNG{i:05d}" for i in range(n_genes - len(genes))]
    path.write_text("gene_id\tsymbol\n" + "".join(f"{g}\t{g}\n" for g in genes))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--cells", type=int, default=50000, help="synthetic atlas cells")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--mae-steps", type=int, default=None)
    p.add_argument("--performer-steps", type=int, default=None)
    p.add_argument("--nproc", type=int, default=2)
    a = p.parse_args(argv)
    import torch

    t0 = time.time()
    out = Path(a.out)
    py = sys.executable
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    nproc = a.nproc if not torch.cuda.is_available() else max(1, min(a.nproc, torch.cuda.device_count()))
    corpus, inputs = out / "corpus", out / "inputs"

    # a second `make demo` starts over: the demo's own outputs (not the MLflow store) are rebuilt
    for own in [corpus, out / "annotation", *(out / "runs" / f"demo_{f}" for f in ("mae", "performer")),
                *(out / "exports" / f"{f}_demo" for f in ("mae", "performer"))]:
        if own.exists():
            print(f"removing the previous demo's {own}")
            shutil.rmtree(own)
    banner("1/4 corpus: real PBMC cells + a synthetic atlas -> Zarr shards + TileDB-SOMA")
    pbmc = inputs / "pbmc68k_counts.h5ad"
    pbmc_counts_h5ad(pbmc)
    demo_vocab(pbmc, inputs / "vocab.tsv", a.genes)
    print(f"wrote {pbmc} (700 labelled Zheng68K cells) and {inputs / 'vocab.tsv'} ({a.genes} genes)")
    synth = f"synthetic://cells={a.cells},genes={a.genes},types=12,datasets=4,seed=0"
    run([py, "-m", "sharding", "build", "--source", str(pbmc), "--source", synth, "--vocab", str(inputs / "vocab.tsv"),
         "--out", str(corpus), "--format", "both", "--cells-per-shard", "8192"], env)

    banner(f"2/4 pretrain: MAE on the Zarr shards, tiny Performer on SOMA ({nproc} processes each, ZeRO-2)")
    runs = {}
    for fam, cfgfile, steps in (("mae", "demo_mae.yaml", a.mae_steps), ("performer", "demo_performer.yaml", a.performer_steps)):
        ov = [f"corpus={corpus}", f"out_dir={out / 'runs'}", f"export_dir={out / 'exports' / (fam + '_demo')}"]
        if steps:
            ov.append(f"max_steps={steps}")
        run([py, "-m", "launch", "--config", f"configs/pretrain/{cfgfile}", "--nproc-per-node", str(nproc), *ov], env)
        runs[fam] = out / "runs" / f"demo_{fam}"

    banner("3/4 annotate: fine-tune on labelled PBMC cells, score held-out cells")
    reports = {}
    for fam in runs:
        rep_dir = out / "annotation" / fam
        run([py, "-m", "evaluate", "report", "--export", str(out / "exports" / f"{fam}_demo"), "--adata", str(pbmc),
             "--label-key", "cell_type", "--test-size", "0.3", "--seed", "0", "--out-dir", str(rep_dir),
             # the PBMC cells carry 765 of the demo vocabulary's 2,000 genes (the rest are synthetic)
             "--min-coverage", "0.3"], env)
        reports[fam] = json.loads((rep_dir / "report.json").read_text())

    banner("4/4 summary")
    for fam, rd in runs.items():
        rows = [r for r in (json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines() if x.strip()) if "loss" in r]
        print(f"{fam:9s} loss {rows[0]['loss']:.4f} (step {rows[0]['step']}) -> {rows[-1]['loss']:.4f} "
              f"(step {rows[-1]['step']}), {rows[-1]['cells_seen']:,} cells seen")
    store = (out / "mlflow.db").resolve()
    print(f"corpus:   {corpus}/  (python -m sharding inspect {corpus})")
    print(f"runs:     {out / 'runs'}/<name>/  (metrics.jsonl, loss_curve.png, checkpoints/)")
    print(f"exports:  {out / 'exports'}/mae_demo, {out / 'exports'}/performer_demo")
    print(f"reports:  {out / 'annotation'}/<family>/  (report.json, confusion_matrix.png, umap.png)")
    print(f"MLflow:   {store}")
    print(f"          open the UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///{store} --host 127.0.0.1 --port 5000")
    print(f"demo finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
