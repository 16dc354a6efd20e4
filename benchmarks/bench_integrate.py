"""Embeddings judged as the seed papers judge them (issue 22), on real cells: Kang 2018 PBMCs, CTRL and STIM
as the two batches, ``seurat_annotations`` (10 types) as the labels.

Every step goes through the command line a user runs, on the exports ``benchmarks.bench_real`` pretrained
on Kang CTRL (run it first; same --work):

1. ``python -m evaluate embed`` with the MAE export (all 14,053 genes) and the Performer export (2,000 HVGs
   of CTRL), on all 13,576 cells (CTRL + STIM);
2. ``python -m evaluate genept --mode sentence`` (GenePT-s: each cell as the symbols of its expressed genes
   ranked by expression, embedded by the local MiniLM);
3. ``python -m evaluate genept`` (GenePT-w) with a STAND-IN gene table: MiniLM embeddings of each gene's
   symbol (GenePT embeds NCBI gene summaries with GPT-3.5; neither is available offline);
4. ``python -m evaluate integrate`` over the four embeddings, beside the PCA-50 baseline it computes;
5. kNN (k=5) annotation CTRL -> STIM on each embedding, macro F1 (PCA-50: the integrate call's own PCA of
   all cells, recomputed here with the same function and seed);
6. ``python -m evaluate interpret`` on the MAE with the canonical PBMC markers, on CTRL cells.

    python -m benchmarks.bench_integrate --work bench_out/real
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_real import REPO, knn_pred, log, run, scores
from benchmarks.real_data import LABEL

BATCH = "stim"
MARKERS = "CD14 Mono=CD14,LYZ;B=MS4A1,CD79A;NK=NKG7,GNLY;CD16 Mono=FCGR3A;CD8 T=CD8A"
EMBEDDINGS = ("X_mae", "X_performer", "X_genept", "X_genept_s")


def combined(work: Path) -> Path:
    """CTRL and STIM in one h5ad (raw counts), as bench_real wrote them."""
    import anndata

    out = work / "integrate" / "kang.h5ad"
    if out.exists():
        return out
    parts = [anndata.read_h5ad(work / f"{c}.h5ad") for c in ("ctrl", "stim")]
    a = anndata.concat(parts, join="inner", merge="same")
    a.obs_names_make_unique()
    out.parent.mkdir(parents=True, exist_ok=True)
    a.write_h5ad(out)
    return out


def symbol_table(h5ad: Path, out: Path) -> Path:
    """The GenePT-w stand-in: MiniLM's embedding of each gene symbol."""
    import anndata

    from scpretrain.evaluate.text import SentenceModel
    from scpretrain.evaluate.vectors import write_vectors

    if out.exists():
        return out
    genes = [str(g) for g in anndata.read_h5ad(h5ad, backed="r").var_names]
    write_vectors(out, genes, SentenceModel().encode(genes, batch_size=256))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_integrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "bench_out" / "real", help="bench_real's work folder")
    p.add_argument("--max-cells", type=int, default=None, help="integrate on a draw of this many cells")
    args = p.parse_args(argv)
    w = args.work
    exports = {"mae": w / "exports" / "mae", "performer": w / "exports" / "performer"}
    missing = [str(e) for e in exports.values() if not (e / "config.json").exists()]
    if missing or not (w / "ctrl.h5ad").exists():
        raise SystemExit(f"bench_integrate: no Kang exports in {w} ({', '.join(missing) or 'ctrl.h5ad'}); run "
                         f"`python -m benchmarks.bench_real --work {w} --skip-transfer` first")
    py, d = sys.executable, w / "integrate"
    t: dict[str, float] = {}
    src = combined(w)
    steps = [("embed MAE", "kang_mae.h5ad", ["embed", "--export", exports["mae"], "--quiet"]),
             ("embed Performer", "kang_perf.h5ad", ["embed", "--export", exports["performer"], "--quiet"]),
             ("GenePT-s", "kang_gs.h5ad", ["genept", "--mode", "sentence"]),
             ("GenePT-w (stand-in table)", "kang_all.h5ad",
              ["genept", "--gene-embeddings", symbol_table(src, d / "symbol_minilm.tsv"), "--quiet"])]
    cur = src
    for name, out, cmd in steps:
        if not (d / out).exists():
            inp = ["--adata", cur] if cmd[0] == "embed" else ["--query", cur]
            t[name] = run([py, "-m", "evaluate", *cmd, *inp, "--out", d / out])
        cur = d / out
    extra = ["--max-cells", str(args.max_cells)] if args.max_cells else []
    t["integrate"] = run([py, "-m", "evaluate", "integrate", "--adata", cur, "--batch-key", BATCH, "--label-key",
                          LABEL, "--embedding", *EMBEDDINGS, "--out-dir", d / "scores", *extra])
    res: dict[str, Any] = {"integration": json.loads((d / "scores" / "integration.json").read_text())}
    res["knn_macro_f1"] = knn_table(cur)
    t["interpret MAE"] = run([py, "-m", "evaluate", "interpret", "--export", exports["mae"], "--adata",
                              w / "ctrl.h5ad", "--label-key", LABEL, "--markers", MARKERS, "--out-dir",
                              d / "interpret_mae", "--quiet"])
    res["timings"] = t
    (d / "results.json").write_text(json.dumps(res, indent=2))
    print_tables(res, d)
    return 0


def knn_table(h5ad: Path) -> dict[str, float]:
    import anndata

    from scpretrain.evaluate.integrate import BASELINE, pca_baseline

    a = anndata.read_h5ad(h5ad)
    a.obsm[BASELINE] = pca_baseline(a)
    ref = (a.obs[BATCH] == "CTRL").to_numpy()
    y = a.obs[LABEL].astype(str).to_numpy()
    classes = sorted(set(y[ref]))
    out = {}
    for key in (BASELINE, *EMBEDDINGS):
        t0 = time.time()
        e = np.asarray(a.obsm[key])
        out[key] = scores(y[~ref], knn_pred(e[ref], y[ref], e[~ref]), classes)["macro_f1"]
        log(f"kNN CTRL -> STIM on {key}: macro F1 {out[key]:.3f} ({time.time() - t0:.0f} s)")
    return out


def print_tables(res: dict[str, Any], d: Path) -> None:
    import pandas as pd

    integ = res["integration"]
    print(f"\n### Integration on Kang 2018 ({integ['n_cells']:,} cells; batches: {integ['batch_key']} CTRL / STIM; "
          f"labels: {integ['label_key']}; {integ['library']})\n")
    cols = [*integ["metrics"]["batch"], *integ["metrics"]["bio"], "batch", "bio", "total"]
    print("| embedding | " + " | ".join(cols) + " | kNN macro F1 CTRL→STIM |\n|---|" + "---|" * (len(cols) + 1))
    for name, row in integ["scores"].items():
        key = name.split(" ")[0]
        f1 = res["knn_macro_f1"].get(key)
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + f" | {f1:.3f} |")
    ranks = pd.read_csv(d / "interpret_mae" / "marker_ranks.tsv", sep="\t")
    print("\n### Marker ranks, `evaluate interpret` on the Kang-CTRL MAE (rank among 14,053 genes, 1 = top)\n")
    print("| cell type | marker | rank | of genes |\n|---|---|---|---|")
    for r in ranks.itertuples(index=False):
        print(f"| {r.cell_type} | {r.marker} | {'not in vocabulary' if pd.isna(r.rank) else int(r.rank)} | "
              f"{r.of_genes:,} |")
    for k, v in res["timings"].items():
        print(f"{k}: {v:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
