"""Journey 4 on a dataset the exports never saw: `python -m evaluate annotate` with its defaults.

For each export: annotate the query batch from the reference batch through the real CLI,
then score the query (Unassigned counts as wrong) beside the baseline fitted on the same
reference (evaluate.baseline, CellTypist's recipe), and the embeddings by 5-NN against
PCA-50 of log-normalized expression.

    python -m benchmarks.bench_downstream --exports demo_out/exports/mae_demo demo_out/exports/performer_demo
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.downstream_data import write_split


def knn_acc(ref: np.ndarray, y_ref: np.ndarray, q: np.ndarray, y_q: np.ndarray, k: int = 5) -> float:
    from scpretrain.evaluate.annotate import knn_proba

    p, classes = knn_proba(ref, y_ref, q, k=k)
    return float(np.mean(np.asarray(classes)[p.argmax(1)] == y_q))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exports", nargs="+", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench_out/downstream"))
    p.add_argument("--cells", type=int, default=4000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--extra", default="", help="extra arguments for evaluate annotate, e.g. '--mode frozen'")
    a = p.parse_args(argv)
    import anndata
    from sklearn.decomposition import PCA

    from scpretrain.evaluate import load_export
    from scpretrain.evaluate.baseline import LogRegBaseline, log_normalize
    from scpretrain.evaluate.metrics import classification_metrics

    rows = []
    for exp in a.exports:
        model = load_export(exp)
        genes = [s or g for g, s in model.vocab]
        d = a.out / exp.name
        ref_p, q_p = write_split(genes, d, a.cells, a.seed)
        ref, q = anndata.read_h5ad(ref_p), anndata.read_h5ad(q_p)
        y_ref, y_q = ref.obs["cell_type"].astype(str).to_numpy(), q.obs["cell_type"].astype(str).to_numpy()
        classes = sorted(set(y_ref))
        out = d / "annotated.h5ad"
        cmd = [sys.executable, "-m", "evaluate", "annotate", "--export", str(exp), "--reference", str(ref_p),
               "--label-key", "cell_type", "--query", str(q_p), "--out", str(out), *a.extra.split()]
        t = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.time() - t
        print("$ " + " ".join(cmd))
        print(proc.stdout[-3000:] + proc.stderr[-2000:])
        if proc.returncode != 0:
            return proc.returncode
        ann = anndata.read_h5ad(out)
        pred = ann.obs["predicted_cell_type"].astype(str).to_numpy()
        m = classification_metrics(y_q, pred, classes)
        base = LogRegBaseline(seed=0).fit(ref.X, y_ref)
        b = classification_metrics(y_q, base.predict(q.X), classes)
        key = model.embedding_key
        emb_ref = ref.copy()
        from scpretrain.evaluate import embed

        embed(model, emb_ref, verbose=False)
        lr, lq = log_normalize(ref.X).toarray(), log_normalize(q.X).toarray()
        pca = PCA(50, random_state=0).fit(lr)
        rows.append({
            "export": exp.name, "seconds": dt, "mode": ann.uns["evaluate"]["mode"],
            "threshold": float(ann.uns["evaluate"]["threshold"]),
            "unassigned": float(np.mean(pred == "Unassigned")), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "baseline_accuracy": b["accuracy"], "baseline_macro_f1": b["macro_f1"],
            "knn_emb": knn_acc(emb_ref.obsm[key], y_ref, ann.obsm[key], y_q),
            "knn_pca": knn_acc(pca.transform(lr), y_ref, pca.transform(lq), y_q)})
    print(f"\nquery: batch B ({a.cells // 2} cells, 8 types, 30%..2%), reference: batch A; seed {a.seed}")
    print(f"{'export':<16} {'mode':<8} {'thr':>6} {'Unassigned':>10} {'acc':>6} {'macroF1':>8} {'LR acc':>7} "
          f"{'LR F1':>6} {'F1/LR':>6} {'5NN emb':>8} {'5NN PCA':>8} {'sec':>5}")
    for r in rows:
        print(f"{r['export']:<16} {r['mode']:<8} {r['threshold']:>6.3f} {r['unassigned']:>10.1%} "
              f"{r['accuracy']:>6.3f} {r['macro_f1']:>8.3f} {r['baseline_accuracy']:>7.3f} "
              f"{r['baseline_macro_f1']:>6.3f} {r['macro_f1'] / r['baseline_macro_f1']:>6.2f} "
              f"{r['knn_emb']:>8.3f} {r['knn_pca']:>8.3f} {r['seconds']:>5.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
