"""Real cells end to end (issue 16): Kang 2018 PBMCs, pretrain on CTRL, annotate STIM from a CTRL reference.

1. Data: the Kang h5ad (benchmarks.real_data, cached download). CTRL cells are the reference and the
   pretraining set; STIM cells (interferon-beta stimulated: a strong shift of expression) are the query.
2. Corpora through the real CLI: ``python -m sharding build`` on the dense h5ad as it ships, with
   ``--holdout stim=STIM`` so STIM cells are never streamed for pretraining; all genes as Zarr (MAE), and
   the 2,000 most variable genes of CTRL as TileDB-SOMA (Performer: 14k tokens per cell are ~7x the CPU
   time of 2k).
3. Pretraining through ``python -m launch`` (torchrun, 2 processes, DeepSpeed ZeRO-2, CPU/gloo).
4. ``python -m evaluate annotate`` with its defaults, then the table: every method fitted on CTRL, scored
   on all STIM cells (accuracy, macro F1, per-class F1; Unassigned counts as wrong where a method rejects),
   and the transfer curve at 1%, 10%, 100% of CTRL labels (pretrained vs random-init vs the baseline).

    python -m benchmarks.bench_real                     # everything, ~30-40 min on 2 CPU cores
    python -m benchmarks.bench_real --skip-pretrain     # reuse the exports of a previous run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_annotation import subsample
from benchmarks.real_data import LABEL, kang_h5ad

REPO = Path(__file__).resolve().parent.parent
FRACTIONS = (0.01, 0.1, 1.0)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str]) -> float:
    log("$ " + " ".join(map(str, cmd)))
    env = {**os.environ}
    env.setdefault("DS_ACCELERATOR", "cpu")
    t = time.time()
    rc = subprocess.call([str(c) for c in cmd], cwd=REPO, env=env)
    if rc != 0:
        raise SystemExit(f"bench_real: step failed with exit code {rc}: {' '.join(map(str, cmd))}")
    return time.time() - t


def prepare(kang: Path, work: Path) -> dict[str, Path]:
    """ctrl.h5ad / stim.h5ad (CSR counts) and the Performer's vocabulary: 2,000 HVGs of CTRL."""
    import anndata
    import scanpy as sc
    import scipy.sparse as sp

    paths = {"ctrl": work / "ctrl.h5ad", "stim": work / "stim.h5ad", "hvg": work / "hvg_vocab.tsv"}
    if all(p.exists() for p in paths.values()):
        return paths
    a = anndata.read_h5ad(kang)
    a.X = sp.csr_matrix(a.X)
    work.mkdir(parents=True, exist_ok=True)
    for cond, key in (("CTRL", "ctrl"), ("STIM", "stim")):
        a[a.obs["stim"] == cond].copy().write_h5ad(paths[key])
    ctrl = a[a.obs["stim"] == "CTRL"].copy()
    sc.pp.normalize_total(ctrl, target_sum=1e4)
    sc.pp.log1p(ctrl)
    sc.pp.highly_variable_genes(ctrl, n_top_genes=2000, flavor="seurat")
    genes = list(ctrl.var_names[ctrl.var["highly_variable"].to_numpy()])
    paths["hvg"].write_text("gene_id\tsymbol\n" + "".join(f"{g}\t{g}\n" for g in genes))
    return paths


# --- methods ----------------------------------------------------------------------------------------

def scores(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    from scpretrain.evaluate.metrics import classification_metrics

    m = classification_metrics(y, pred, classes)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "per_class_f1": {c: v["f1"] for c, v in m["per_class"].items()},
            "unassigned": float(np.mean(np.asarray(pred) == "Unassigned"))}


def head_pred(model: Any, ref: Any, y_ref: np.ndarray, query: Any, head: str, mode: str, seed: int) -> np.ndarray:
    from scpretrain.evaluate.finetune import fit_classifier

    clf = fit_classifier(model, ref, y_ref, head, mode, seed=seed)
    proba, _ = clf.predict(query)
    return np.asarray(clf.classes)[proba.argmax(1)]


def knn_pred(ref_emb: np.ndarray, y_ref: np.ndarray, q_emb: np.ndarray, k: int = 5) -> np.ndarray:
    from scpretrain.evaluate.annotate import knn_proba

    p, classes = knn_proba(ref_emb, y_ref, q_emb, k=k)
    return np.asarray(classes)[p.argmax(1)]


def annotate_cli(export: Path, paths: dict, out: Path, extra: list[str]) -> tuple[np.ndarray, float, dict]:
    import anndata

    t = run([sys.executable, "-m", "evaluate", "annotate", "--export", export, "--reference", paths["ctrl"],
             "--label-key", LABEL, "--query", paths["stim"], "--out", out, *extra])
    ann = anndata.read_h5ad(out)
    return ann.obs[f"predicted_{LABEL}"].astype(str).to_numpy(), t, dict(ann.uns["evaluate"])


def table(args: argparse.Namespace, paths: dict, exports: dict[str, Path]) -> dict[str, Any]:
    import anndata
    from sklearn.decomposition import PCA

    from scpretrain import evaluate
    from benchmarks.bench_annotation import write_random_export
    from scpretrain.evaluate.align import align_to_vocab
    from scpretrain.evaluate.baseline import LogRegBaseline, log_normalize
    from scpretrain.evaluate.embedding import embed_counts
    from scpretrain.evaluate.genept import GeneVectors, export_gene_vectors, genept_w

    ctrl, stim = anndata.read_h5ad(paths["ctrl"]), anndata.read_h5ad(paths["stim"])
    y_ref, y_q = ctrl.obs[LABEL].astype(str).to_numpy(), stim.obs[LABEL].astype(str).to_numpy()
    classes = sorted(set(y_ref))
    rows: dict[str, dict] = {}
    times: dict[str, float] = {}

    def add(name: str, pred: np.ndarray, t0: float) -> None:
        rows[name] = scores(y_q, pred, classes)
        times[name] = time.time() - t0
        log(f"{name}: macro F1 {rows[name]['macro_f1']:.3f}, accuracy {rows[name]['accuracy']:.3f} "
            f"({times[name]:.0f} s)")

    # the baselines, on the raw counts of all genes
    t0 = time.time()
    add("logistic regression, all expressed genes (CellTypist recipe: log-norm, scaled, clip 10, C=0.1)",
        LogRegBaseline(seed=0).fit(ctrl.X, y_ref).predict(stim.X), t0)
    hvg = [line.split("\t")[0] for line in paths["hvg"].read_text().splitlines()[1:]]
    cols = np.flatnonzero(np.isin(np.asarray(ctrl.var_names), hvg))
    t0 = time.time()
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(max_iter=1000).fit(log_normalize(ctrl.X[:, cols]), y_ref)
    add("logistic regression, 2,000 HVGs of CTRL (log-normalized, unscaled, C=1)",
        lr.predict(log_normalize(stim.X[:, cols])), t0)
    t0 = time.time()
    lr_ref, lr_q = log_normalize(ctrl.X).toarray(), log_normalize(stim.X).toarray()
    pca = PCA(50, random_state=0).fit(lr_ref)
    add("PCA-50 of log-normalized expression + kNN (k=5)", knn_pred(pca.transform(lr_ref), y_ref,
                                                                      pca.transform(lr_q)), t0)
    del lr_ref, lr_q

    for fam, exp in exports.items():
        model = evaluate.load_export(exp)
        rnd_dir = args.work / "exports" / f"{fam}_random"
        if not rnd_dir.exists():
            write_random_export(exp, rnd_dir, seed=0)
        rnd = evaluate.load_export(rnd_dir)
        ref, _ = align_to_vocab(ctrl, model.vocab, min_coverage=0.1, name="ctrl", verbose=False)
        q, _ = align_to_vocab(stim, model.vocab, min_coverage=0.1, name="stim", verbose=False)
        genes = f"{model.n_genes:,} genes"
        # a Performer fine-tuned through its 2,000 tokens runs at tens of cells/s on 2 CPU cores: its
        # annotate row is frozen (the scBERT head on the frozen encoder); the MAE row is the true default
        extra = [] if fam == "mae" else ["--mode", "frozen"]
        t0 = time.time()
        pred, t, info = annotate_cli(exp, paths, args.work / f"stim_{fam}_default.h5ad", extra)
        rows_name = (f"{fam} ({genes}): `evaluate annotate` {' '.join(extra) or 'defaults'} -> {info['mode']}, "
                     f"{info['head']} head (calibrated Unassigned)")
        add(rows_name, pred, t0)
        rows[rows_name]["heldout"] = info.get("heldout")
        rows[rows_name]["calibration"] = info.get("calibration")
        for arm, m in (("pretrained", model), ("random-init", rnd)):
            t0 = time.time()
            add(f"{fam} ({genes}) {arm}: frozen + linear head", head_pred(m, ref, y_ref, q, "linear", "frozen", 0),
                t0)
            if fam == "mae":
                t0 = time.time()
                add(f"{fam} ({genes}) {arm}: full fine-tune + linear head",
                    head_pred(m, ref, y_ref, q, "linear", "full", 0), t0)
            t0 = time.time()
            add(f"{fam} ({genes}) {arm}: kNN (k=5) on the embedding",
                knn_pred(embed_counts(m, ref), y_ref, embed_counts(m, q)), t0)
        if fam == "performer":
            t0 = time.time()
            gv = export_gene_vectors(model)
            er, _ = genept_w(ctrl, gv, min_coverage=0.05, name="ctrl", verbose=False)
            eq, _ = genept_w(stim, gv, min_coverage=0.05, name="stim", verbose=False)
            add("GenePT-w, STAND-IN: the Performer's learned gene embeddings + kNN (k=5)", knn_pred(er, y_ref, eq),
                t0)
    t0 = time.time()
    genes_all = [str(g) for g in ctrl.var_names]
    vec = np.random.default_rng(0).normal(size=(len(genes_all), 256)).astype(np.float32)
    gv = GeneVectors(genes_all, vec, "random")
    er, _ = genept_w(ctrl, gv, min_coverage=0.05, name="ctrl", verbose=False)
    eq, _ = genept_w(stim, gv, min_coverage=0.05, name="stim", verbose=False)
    add("GenePT-w, STAND-IN: seeded random gene vectors (width 256; no GenePT file offline) + kNN (k=5)",
        knn_pred(er, y_ref, eq), t0)
    return {"rows": rows, "seconds": times, "classes": classes, "n_ref": int(len(y_ref)), "n_query": int(len(y_q))}


def transfer(args: argparse.Namespace, paths: dict, export: Path, table_rows: dict) -> dict[str, Any]:
    import anndata

    from scpretrain import evaluate
    from scpretrain.evaluate.align import align_to_vocab
    from scpretrain.evaluate.baseline import LogRegBaseline

    ctrl, stim = anndata.read_h5ad(paths["ctrl"]), anndata.read_h5ad(paths["stim"])
    y_ref, y_q = ctrl.obs[LABEL].astype(str).to_numpy(), stim.obs[LABEL].astype(str).to_numpy()
    classes = sorted(set(y_ref))
    arms = {"pretrained": evaluate.load_export(export),
            "random-init": evaluate.load_export(args.work / "exports" / "mae_random")}
    ref, _ = align_to_vocab(ctrl, arms["pretrained"].vocab, name="ctrl", verbose=False)
    q, _ = align_to_vocab(stim, arms["pretrained"].vocab, name="stim", verbose=False)
    out: dict[str, Any] = {}
    for frac in FRACTIONS:
        if frac >= 1.0:  # all labels, seed 0: the table's rows (same fits), not fitted twice
            full = {arm: next(r for n, r in table_rows.items() if n.startswith("mae") and f" {arm}: full" in n)
                    for arm in arms}
            base = next(r for n, r in table_rows.items() if n.startswith("logistic regression, all"))
            out["1"] = {"n_labelled": [len(y_ref)], **{a: [r["macro_f1"]] for a, r in full.items()},
                        "baseline": [base["macro_f1"]]}
            continue
        seeds = range(args.transfer_seeds)
        res: dict[str, list] = {"n_labelled": []}
        for seed in seeds:
            t0 = time.time()
            sub = subsample(y_ref, frac, seed)
            res["n_labelled"].append(int(len(sub)))
            for arm, m in arms.items():
                res.setdefault(arm, []).append(scores(y_q, head_pred(m, ref[sub], y_ref[sub], q, "linear", "full",
                                                                     seed), classes)["macro_f1"])
            base = LogRegBaseline(seed=seed).fit(ctrl.X[sub], y_ref[sub]).predict(stim.X)
            res.setdefault("baseline", []).append(scores(y_q, base, classes)["macro_f1"])
            log(f"transfer {frac:.0%} seed {seed}: {len(sub)} labelled cells, pretrained "
                f"{res['pretrained'][-1]:.3f}, random-init {res['random-init'][-1]:.3f}, baseline "
                f"{res['baseline'][-1]:.3f} ({time.time() - t0:.0f} s)")
        out[f"{frac:g}"] = res
    return out


# --- output -----------------------------------------------------------------------------------------

def ms(v: list[float]) -> str:
    a = np.asarray(v)
    return f"{a.mean():.3f}" + (f" ± {a.std(ddof=1):.3f}" if len(a) > 1 else "")


def print_tables(res: dict[str, Any]) -> None:
    t = res["table"]
    print(f"\n### Kang 2018 PBMCs: reference CTRL ({t['n_ref']:,} cells), query STIM ({t['n_query']:,} cells), "
          f"{len(t['classes'])} types ({LABEL})\n")
    print("| method | accuracy | macro F1 | Unassigned | seconds |\n|---|---|---|---|---|")
    for name, r in t["rows"].items():
        print(f"| {name} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['unassigned']:.1%} | "
              f"{t['seconds'][name]:.0f} |")
    print("\nPer-class F1 on STIM:\n")
    names = list(t["rows"])
    short = [f"({i + 1})" for i in range(len(names))]
    print("| type | " + " | ".join(short) + " |\n|---|" + "---|" * len(names))
    for c in t["classes"]:
        print(f"| {c} | " + " | ".join(f"{t['rows'][n]['per_class_f1'][c]:.2f}" for n in names) + " |")
    print("\n" + "; ".join(f"{s} {n}" for s, n in zip(short, names)))
    if "transfer" in res:
        print("\n### Transfer: MAE full fine-tune + linear head on a fraction of CTRL labels, scored on STIM "
              "(macro F1)\n")
        print("| CTRL labels | labelled cells | pretrained | random-init | Δ | baseline (CellTypist recipe) |\n"
              "|---|---|---|---|---|---|")
        for frac, r in res["transfer"].items():
            d = np.mean(r["pretrained"]) - np.mean(r["random-init"])
            print(f"| {float(frac):.0%} | {np.mean(r['n_labelled']):.0f} | {ms(r['pretrained'])} | "
                  f"{ms(r['random-init'])} | {d:+.3f} | {ms(r['baseline'])} |")
    for k, v in res.get("timings", {}).items():
        print(f"{k}: {v:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_real", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "bench_out" / "real")
    p.add_argument("--cache", type=Path, default=None, help="download cache (default ~/.cache/scpretrain/kang)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--mae-steps", type=int, default=1200)
    p.add_argument("--performer-steps", type=int, default=2000)
    p.add_argument("--mae-hidden", default="[512,256]", help="MAE encoder widths (latent 64)")
    p.add_argument("--skip-pretrain", action="store_true", help="reuse WORK/exports from a previous run")
    p.add_argument("--skip-transfer", action="store_true")
    p.add_argument("--transfer-seeds", type=int, default=3, help="subsamples at 1%% and 10%% (default 3)")
    p.add_argument("--json", type=Path, default=None, help="write all numbers here (default WORK/results.json)")
    args = p.parse_args(argv)
    t_all = time.time()
    timings: dict[str, float] = {}
    kang = kang_h5ad(args.cache)
    paths = prepare(kang, args.work)
    py = sys.executable
    corpus, corpus_hvg = args.work / "corpus", args.work / "corpus_hvg"
    exports = {"mae": args.work / "exports" / "mae", "performer": args.work / "exports" / "performer"}
    if not args.skip_pretrain:
        for c in (corpus, corpus_hvg):
            if (c / "manifest.json").exists():
                run([py, "-m", "sharding", "verify", c])
        common = ["--source", kang, "--keep-obs", f"{LABEL},cell_type,stim", "--holdout", "stim=STIM",
                  "--dataset-key", "orig.ident"]
        if not (corpus / "manifest.json").exists():
            timings["build corpus (all genes, Zarr)"] = run([py, "-m", "sharding", "build", *common, "--out", corpus,
                                                              "--format", "zarr"])
        if not (corpus_hvg / "manifest.json").exists():
            timings["build corpus (2,000 HVGs, SOMA)"] = run([py, "-m", "sharding", "build", *common, "--vocab",
                                                               paths["hvg"], "--min-coverage", "0.1",
                                                               "--out", corpus_hvg, "--format", "soma"])
        runs = args.work / "runs"
        timings["pretrain MAE"] = run([
            py, "-m", "launch", "--config", "configs/pretrain/demo_mae.yaml", "--nproc-per-node", args.nproc,
            f"corpus={corpus}", f"out_dir={runs}", "name=kang_mae", f"max_steps={args.mae_steps}",
            f"export_dir={exports['mae']}", f"model.params.hidden={args.mae_hidden}", "model.params.latent=64",
            "data.batch_size=128", "optim.lr=0.001", "optim.warmup_steps=50", "checkpoint.every_steps=500",
            "tracking.eval_every=500", "checkpoint.allow_fresh_start=true"])
        timings["pretrain Performer"] = run([
            py, "-m", "launch", "--config", "configs/pretrain/demo_performer.yaml", "--nproc-per-node", args.nproc,
            f"corpus={corpus_hvg}", f"out_dir={runs}", "name=kang_performer", f"max_steps={args.performer_steps}",
            f"export_dir={exports['performer']}", "data.batch_size=8", "checkpoint.every_steps=400",
            "tracking.eval_every=400", "checkpoint.allow_fresh_start=true"])
    res: dict[str, Any] = {"timings": timings}
    t0 = time.time()
    res["table"] = table(args, paths, exports)
    timings["table"] = time.time() - t0
    if not args.skip_transfer:
        t0 = time.time()
        res["transfer"] = transfer(args, paths, exports["mae"], res["table"]["rows"])
        timings["transfer curve"] = time.time() - t0
    timings["total"] = time.time() - t_all
    out = args.json or args.work / "results.json"
    out.write_text(json.dumps(res, indent=2))
    print_tables(res)
    print(f"\nall numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
