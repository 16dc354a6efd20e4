"""Set up the SSL-paper transfer experiment: pretrain on a synthetic atlas with one dataset held
out, then hand the held-out dataset to ``bench_annotation`` (1%, 10%, 100% of its labels, with and
without pretraining).

    python -m benchmarks.transfer_setup --out bench_out/transfer
    # then (printed at the end):
    python -m benchmarks.bench_annotation --skip-pbmc --pretrained-export bench_out/transfer/export \
        --transfer-h5ad bench_out/transfer/heldout.h5ad --transfer-label-key cell_type

The held-out dataset never reaches pretraining: the corpus is built with ``--holdout`` and the
loader streams only ``split == "train"`` cells.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def heldout_h5ad(corpus: Path, out: Path) -> int:
    """The held-out cells of a corpus (read from its Zarr shards) as one h5ad of raw counts."""
    import anndata as ad

    parts = []
    for shard in sorted((corpus / "zarr").glob("shard-*.zarr")):
        a = ad.read_zarr(shard)
        parts.append(a[a.obs["split"] == "holdout"].copy())
    held = ad.concat(parts)
    held.obs = held.obs[["cell_type", "dataset_id"]].astype(str)
    held.write_h5ad(out)
    return held.n_obs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transfer_setup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/transfer")
    p.add_argument("--cells", type=int, default=40000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--nproc", type=int, default=2)
    a = p.parse_args(argv)
    out = Path(a.out)
    corpus = out / "corpus"
    env = {**os.environ}
    env.setdefault("DS_ACCELERATOR", "cpu")
    if not (corpus / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "sharding", "build", "--source",
                        f"synthetic://cells={a.cells},genes={a.genes},types=12,datasets=4,seed=7",
                        "--holdout", "dataset_id=synthetic_3", "--out", str(corpus), "--format", "zarr"],
                       cwd=REPO, check=True, env=env)
    export = out / "export"
    subprocess.run([sys.executable, "-m", "launch", "--config", "configs/pretrain/demo_mae.yaml",
                    "--nproc-per-node", str(a.nproc), f"corpus={corpus}", f"out_dir={out / 'runs'}",
                    "name=transfer_mae", f"max_steps={a.steps}", f"export_dir={export}",
                    "checkpoint.allow_fresh_start=true", "checkpoint.resume=never"], cwd=REPO, check=True, env=env)
    n = heldout_h5ad(corpus, out / "heldout.h5ad")
    print(f"held-out dataset: {n} cells -> {out / 'heldout.h5ad'}")
    print(f"next: python -m benchmarks.bench_annotation --skip-pbmc --pretrained-export {export} "
          f"--transfer-h5ad {out / 'heldout.h5ad'} --transfer-label-key cell_type --json {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
