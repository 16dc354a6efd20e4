"""Cell-type annotation protocol: exports against classical baselines, and pretraining vs. none.

Prints markdown tables (progress goes to stderr), and with ``--json`` writes every number.

1. **PBMC** (always, unless ``--skip-pbmc``): ``scanpy.datasets.pbmc68k_reduced()``, 700 real
   Zheng68K cells with 10 ``bulk_labels``, integer counts recovered from ``.raw`` exactly as
   the demo does (``launch.demo.pbmc_counts_h5ad``). Stratified k-fold CV (default 5);
   accuracy and macro F1, mean ± sd over folds, for each ``--export``'s head (fine-tuned in
   each ``--mode``), kNN (k=5, cosine) on each export's embedding, logistic regression on
   log-normalized expression and PCA(50) + kNN on log-normalized expression.
2. **Transfer** (with ``--pretrained-export`` and ``--transfer-h5ad``), after Richter et al.
   2024: fine-tune on a held-out labelled dataset with 1%, 10% and 100% of its training
   labels (per fold, stratified, at least one cell per type), from the pretrained export and
   from an untrained model of the same architecture (``--random-export``, written for you
   when not given), plus logistic regression on the same labelled cells.

Examples::

    python -m benchmarks.bench_annotation --export exports/mae_v1 --export exports/performer_v1
    python -m benchmarks.bench_annotation --skip-pbmc --pretrained-export exports/mae_v1 \\
        --transfer-h5ad heldout.h5ad --transfer-label-key cell_type --json bench_out/annotation.json
    python -m benchmarks.bench_annotation --write-random-export exports/mae_v1 exports/mae_v1_random
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FRACTIONS = (0.01, 0.1, 1.0)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- inputs ---------------------------------------------------------------------------------------

def pbmc_adata() -> Any:
    """The 700 labelled PBMC cells with integer counts, via the demo's own recovery from ``.raw``."""
    import anndata

    from scpretrain.launch.demo import pbmc_counts_h5ad

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "pbmc68k_counts.h5ad"
        pbmc_counts_h5ad(path)
        return anndata.read_h5ad(path)


def write_random_export(src: str | Path, out: str | Path, seed: int = 0) -> Path:
    """An export of ``src``'s architecture, preprocessing and vocabulary with freshly initialized weights.

    The "without pretraining" arm of the transfer experiment. A Performer's gene embedding is random
    too (gene2vec, if the source loaded one, is not carried over: nothing pretrained is).
    """
    import torch

    from scpretrain import evaluate
    from scpretrain import scmodels
    from scpretrain.train.export import export_model

    source = evaluate.load_export(src)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = scmodels.build_model(source.family, dict(source.config["model"]))
    prov = {"random_init_seed": seed, "architecture_of": str(Path(src).resolve()), "steps": 0,
            "cells_seen": 0}
    return export_model(out, model.eval(), source.preprocessing, source.vocab, provenance=prov)


def labelled(adata: Any, key: str, name: str) -> tuple[Any, np.ndarray]:
    from scpretrain.evaluate.finetune import labels_of

    labels, rows = labels_of(adata, key, name=name)
    return adata[rows].copy() if len(rows) < adata.n_obs else adata, labels


def fold_splits(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    _, counts = np.unique(labels, return_counts=True)
    if counts.min() < folds:
        log(f"note: the rarest class has {counts.min()} cells, fewer than {folds} folds; it is missing "
            "from some test folds")
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(labels)), labels))


def subsample(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices: ``max(1, round(fraction * n_c))`` cells of each class (all of them at 1.0)."""
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:max(1, int(round(fraction * np.sum(labels == c))))]
            for c in sorted(set(labels.tolist()))]
    return np.sort(np.concatenate(keep))


# --- methods --------------------------------------------------------------------------------------

def scores(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, float]:
    from scpretrain.evaluate.metrics import classification_metrics

    m = classification_metrics(y_true, y_pred, classes)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int) -> np.ndarray:
    from scpretrain.evaluate.annotate import knn_proba

    proba, classes = knn_proba(train_x, train_y, test_x, k=k)  # every neighbour votes: the MAE protocol
    return np.asarray(classes)[proba.argmax(axis=1)]


def pca_knn_predict(train_counts: Any, train_y: np.ndarray, test_counts: Any, k: int, seed: int,
                    n_comps: int = 50) -> np.ndarray:
    """Log-normalize, PCA (fit on the training fold), kNN: the classical scanpy embedding."""
    from sklearn.decomposition import PCA

    from scpretrain.evaluate.report import log_normalize

    tr, te = log_normalize(train_counts).toarray(), log_normalize(test_counts).toarray()
    pca = PCA(n_components=min(n_comps, tr.shape[0] - 1, tr.shape[1]), random_state=seed).fit(tr)
    return knn_predict(pca.transform(tr), train_y, pca.transform(te), k)


def head_predict(model: Any, train_counts: Any, train_y: np.ndarray, test_counts: Any, head: str, mode: str,
                 unfreeze: int, seed: int, device: str | None, fit_kwargs: dict) -> np.ndarray:
    from scpretrain.evaluate.finetune import fit_classifier

    clf = fit_classifier(model, train_counts, train_y, head, mode, unfreeze, seed=seed, device=device,
                         **fit_kwargs)
    proba, _ = clf.predict(test_counts, device=device)
    return np.asarray(clf.classes)[proba.argmax(axis=1)]


# --- the two experiments --------------------------------------------------------------------------

def run_pbmc(args: argparse.Namespace, fit_kwargs: dict) -> dict[str, Any]:
    import scipy.sparse as sp

    from scpretrain import evaluate
    from scpretrain.evaluate.align import align_to_vocab
    from scpretrain.evaluate.classifier import resolve_kind
    from scpretrain.evaluate.embedding import embed_counts
    from scpretrain.evaluate.report import logreg_predict

    adata, labels = labelled(pbmc_adata(), "cell_type", "pbmc68k_reduced")
    classes = sorted(set(labels.tolist()))
    raw = sp.csr_matrix(adata.X)
    splits = fold_splits(labels, args.folds, args.seed)
    exports = []
    for path in args.export:
        model = evaluate.load_export(path)
        counts, cov = align_to_vocab(adata, model.vocab, min_coverage=args.min_coverage, name=str(path),
                                     verbose=False)
        emb = embed_counts(model, counts, device=args.device)
        exports.append((path, model, counts, emb, cov.fraction))
        log(f"{path}: {model.family}, gene coverage {cov.n_matched}/{cov.n_vocab} ({cov.fraction:.1%})")

    rows: dict[str, list[dict[str, float]]] = {}
    for fold, (tr, te) in enumerate(splits):
        t0 = time.time()
        y_tr, y_te = labels[tr], labels[te]
        for path, model, counts, emb, _ in exports:
            kind = resolve_kind(args.head, model.family)
            for mode in args.mode:
                pred = head_predict(model, counts[tr], y_tr, counts[te], kind, mode, args.unfreeze,
                                    args.seed + fold, args.device, fit_kwargs)
                rows.setdefault(f"{path}: {kind} head, {mode}", []).append(scores(y_te, pred, classes))
            rows.setdefault(f"{path}: kNN (k={args.k}) on {model.embedding_key}", []).append(
                scores(y_te, knn_predict(emb[tr], y_tr, emb[te], args.k), classes))
        rows.setdefault("logistic regression, log-normalized expression", []).append(
            scores(y_te, logreg_predict(raw[tr], y_tr, raw[te], seed=args.seed), classes))
        rows.setdefault(f"PCA(50) + kNN (k={args.k}), log-normalized expression", []).append(
            scores(y_te, pca_knn_predict(raw[tr], y_tr, raw[te], args.k, args.seed), classes))
        log(f"pbmc fold {fold + 1}/{len(splits)} done ({time.time() - t0:.0f} s)")
    return {"dataset": "pbmc68k_reduced (Zheng68K, bulk_labels)", "n_cells": int(len(labels)),
            "n_classes": len(classes), "folds": args.folds, "seed": args.seed,
            "coverage": {str(p): c for p, _, _, _, c in exports}, "methods": rows}


def run_transfer(args: argparse.Namespace, fit_kwargs: dict) -> dict[str, Any]:
    import anndata
    import scipy.sparse as sp

    from scpretrain import evaluate
    from scpretrain.evaluate.align import align_to_vocab, count_source
    from scpretrain.evaluate.classifier import resolve_kind
    from scpretrain.evaluate.report import logreg_predict

    random_dir = args.random_export
    if random_dir is None:
        random_dir = Path(args.work_dir) / "random_export"
        write_random_export(args.pretrained_export, random_dir, seed=args.seed)
        log(f"wrote an untrained export of the same architecture to {random_dir}")
    arms = {"pretrained": evaluate.load_export(args.pretrained_export),
            "random init": evaluate.load_export(random_dir)}
    if arms["pretrained"].config["model"] != arms["random init"].config["model"]:
        raise SystemExit(f"error: {random_dir} is not the architecture of {args.pretrained_export} "
                         "(config.json field 'model' differs); write one with --write-random-export")
    if arms["pretrained"].weights_sha256 == arms["random init"].weights_sha256:
        raise SystemExit(f"error: {random_dir} has the very weights of {args.pretrained_export} (was the "
                         "'pretrained' export never trained?); write a random one with another --seed")
    kind = resolve_kind(args.head, arms["pretrained"].family)
    adata, labels = labelled(anndata.read_h5ad(args.transfer_h5ad), args.transfer_label_key,
                             args.transfer_h5ad)
    classes = sorted(set(labels.tolist()))
    counts, cov = align_to_vocab(adata, arms["pretrained"].vocab, min_coverage=args.min_coverage,
                                 layer=args.transfer_layer, name=str(args.transfer_h5ad), verbose=False)
    log(f"{args.transfer_h5ad}: {len(labels)} labelled cells, {len(classes)} classes, gene coverage "
        f"{cov.fraction:.1%}")
    raw = sp.csr_matrix(count_source(adata, args.transfer_layer)[0])
    splits = fold_splits(labels, args.folds, args.seed)
    results: dict[str, dict[str, list]] = {}
    for fold, (tr, te) in enumerate(splits):
        for frac in args.fractions:
            t0 = time.time()
            sub = tr[subsample(labels[tr], frac, args.seed * 1000 + fold)]
            key = f"{frac:g}"
            res = results.setdefault(key, {"n_labelled": []})
            res["n_labelled"].append(int(len(sub)))
            for arm, model in arms.items():
                pred = head_predict(model, counts[sub], labels[sub], counts[te], kind, args.transfer_mode,
                                    args.unfreeze, args.seed + fold, args.device, fit_kwargs)
                res.setdefault(arm, []).append(scores(labels[te], pred, classes))
            if len(set(labels[sub].tolist())) > 1:
                pred = logreg_predict(raw[sub], labels[sub], raw[te], seed=args.seed)
                res.setdefault("logreg", []).append(scores(labels[te], pred, classes))
            log(f"transfer fold {fold + 1}/{len(splits)}, {frac:.0%} of labels ({len(sub)} cells) done "
                f"({time.time() - t0:.0f} s)")
    return {"dataset": str(args.transfer_h5ad), "label_key": args.transfer_label_key,
            "n_cells": int(len(labels)), "n_classes": len(classes), "folds": args.folds, "coverage": cov.fraction, "head": kind,
            "mode": args.transfer_mode, "pretrained_export": str(args.pretrained_export),
            "random_export": str(random_dir), "fractions": results}


# --- tables ---------------------------------------------------------------------------------------

def mean_sd(values: list[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def pbmc_table(res: dict[str, Any]) -> str:
    lines = [f"### {res['dataset']}: {res['n_cells']} cells, {res['n_classes']} classes, stratified "
             f"{res['folds']}-fold CV (mean ± sd over folds)", "",
             "| method | accuracy | macro F1 |", "|---|---|---|"]
    for name, runs in res["methods"].items():
        lines.append(f"| {name} | {mean_sd([r['accuracy'] for r in runs])} | "
                     f"{mean_sd([r['macro_f1'] for r in runs])} |")
    for path, frac in res["coverage"].items():
        lines.append(f"\n{path}: {frac:.1%} of its genes are in the PBMC data (the rest are zero-filled).")
    return "\n".join(lines)


def transfer_table(res: dict[str, Any]) -> str:
    lines = [f"### Transfer to {res['dataset']} ({res['label_key']}): {res['n_cells']} cells, "
             f"{res['n_classes']} classes, {res['folds']}-fold CV; {res['head']} head, {res['mode']} fine-tuning; gene coverage "
             f"{res['coverage']:.1%}", "",
             "| labels used | labelled cells | pretrained acc | pretrained macro F1 | random-init acc | "
             "random-init macro F1 | Δ macro F1 | logreg macro F1 |", "|---|---|---|---|---|---|---|---|"]
    for frac, r in res["fractions"].items():
        f1 = {arm: [x["macro_f1"] for x in r[arm]] for arm in ("pretrained", "random init")}
        delta = np.mean(f1["pretrained"]) - np.mean(f1["random init"])
        lr = mean_sd([x["macro_f1"] for x in r["logreg"]]) if r.get("logreg") else "n/a"
        lines.append(f"| {float(frac):.0%} | {np.mean(r['n_labelled']):.0f} | "
                     f"{mean_sd([x['accuracy'] for x in r['pretrained']])} | {mean_sd(f1['pretrained'])} | "
                     f"{mean_sd([x['accuracy'] for x in r['random init']])} | {mean_sd(f1['random init'])} | "
                     f"{delta:+.3f} | {lr} |")
    lines.append("\nΔ > 0: pretraining helped; Δ ≤ 0: it did not (recorded as such).")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_annotation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", action="append", default=[], metavar="DIR",
                   help="export to score on PBMC (repeatable)")
    p.add_argument("--head", default="auto", choices=("auto", "linear", "mlp", "scbert"),
                   help="head to fine-tune (default auto: scbert for a Performer, linear for an MAE)")
    p.add_argument("--mode", action="append", choices=("frozen", "partial", "full"), default=None,
                   help="PBMC fine-tuning mode(s), repeatable (default frozen)")
    p.add_argument("--unfreeze", type=int, default=1, metavar="N",
                   help="blocks --mode partial trains (default 1)")
    p.add_argument("--max-epochs", type=int, default=None, metavar="N",
                   help="cap on training epochs (default: evaluate's, 300 frozen linear/mlp, else 50)")
    p.add_argument("--folds", type=int, default=5, help="stratified CV folds (default 5)")
    p.add_argument("--k", type=int, default=5, help="neighbours for the kNN rows (default 5)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the folds, subsamples and training (default 0)")
    p.add_argument("--min-coverage", type=float, default=0.3, metavar="F",
                   help="refuse an export sharing fewer of its genes with the data (default 0.3: the demo's "
                   "2,000-gene vocabulary holds the PBMC's 765 genes)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--skip-pbmc", action="store_true", help="run only the transfer experiment")
    t = p.add_argument_group("transfer experiment")
    t.add_argument("--pretrained-export", metavar="DIR", help="the pretrained export")
    t.add_argument("--random-export", metavar="DIR",
                   help="an untrained export of the same architecture (default: written into --work-dir)")
    t.add_argument("--transfer-h5ad", metavar="FILE", help="held-out labelled dataset (raw counts)")
    t.add_argument("--transfer-label-key", default="cell_type", metavar="KEY", help="its label column")
    t.add_argument("--transfer-layer", default=None, metavar="LAYER", help="its counts layer (default X)")
    t.add_argument("--transfer-mode", default="full", choices=("frozen", "partial", "full"),
                   help="fine-tuning mode for both arms (default full, as in the SSL paper)")
    t.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS), metavar="F,F,...",
                   help="fractions of the training labels (default 0.01,0.1,1)")
    t.add_argument("--work-dir", default="bench_out/annotation", metavar="DIR",
                   help="where a generated random export goes (default bench_out/annotation)")
    p.add_argument("--json", metavar="FILE", help="also write all numbers here")
    p.add_argument("--write-random-export", nargs=2, metavar=("FROM_EXPORT", "OUT"),
                   help="only write an untrained export of FROM_EXPORT's architecture to OUT, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.write_random_export:
        out = write_random_export(*args.write_random_export, seed=args.seed)
        print(f"wrote {out}")
        return 0
    args.mode = args.mode or ["frozen"]
    args.fractions = [float(f) for f in args.fractions.split(",") if f]
    transfer = args.pretrained_export is not None
    if transfer and args.transfer_h5ad is None:
        raise SystemExit("error: --pretrained-export needs --transfer-h5ad FILE "
                         "(and --transfer-label-key KEY)")
    if args.skip_pbmc and not transfer:
        raise SystemExit("error: --skip-pbmc leaves nothing to run; pass --pretrained-export and "
                         "--transfer-h5ad")
    fit_kwargs = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
    t0 = time.time()
    out: dict[str, Any] = {}
    if not args.skip_pbmc:
        out["pbmc"] = run_pbmc(args, fit_kwargs)
        print(pbmc_table(out["pbmc"]) + "\n", flush=True)
    if transfer:
        out["transfer"] = run_transfer(args, fit_kwargs)
        print(transfer_table(out["transfer"]) + "\n", flush=True)
    log(f"done in {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
