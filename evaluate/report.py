"""Held-out evaluation of an export against simple baselines: what the demo prints.

One stratified split of the labelled cells; on the held-out part it scores (a) a head
fine-tuned on the export (encoder frozen, partly or fully unfrozen), (b) kNN on the
export's embeddings, (c) logistic regression on log-normalized expression and (d)
always predicting the majority class.
A pretrained encoder earns its keep only where (a) and (b) beat (c) and (d).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from scpretrain.evaluate.align import align_to_vocab
from scpretrain.evaluate.annotate import (
    UNASSIGNED,
    VAL_FRACTION,
    assign,
    fit_best_mode,
    knn_proba,
    write_pictures,
)
from scpretrain.evaluate.baseline import DESCRIPTION as LOGREG
from scpretrain.evaluate.baseline import log_normalize, logreg_predict  # noqa: F401  (importable from here, as before)
from scpretrain.evaluate.embedding import as_export, embed_counts
from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.export_io import Export
from scpretrain.evaluate.finetune import labels_of, stratified_split
from scpretrain.evaluate.options import FitOptions, ReadOptions, split_options


# long: a linear script of the report's rows (head, kNN, expression baseline, majority class) and its plots.
def report(
    model: Export | str | Path,
    adata: Any,
    label_key: str,
    test_size: float = 0.3,
    seed: int = 0,
    head: str = "auto",
    out_dir: str | Path | None = None,
    *,
    mode: str = "auto",
    unfreeze: int | list[int] = 1,
    k: int = 5,
    threshold: float = 0.5,
    umap: bool = True,
    read: ReadOptions | None = None,
    fit: FitOptions | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Score the export on a held-out ``test_size`` of ``adata``'s labelled cells; returns the numbers.

    The head ("auto": scbert for a Performer, linear for an MAE) is fine-tuned in ``mode``
    ("frozen", "partial", "full"; see ``evaluate.classifier``) on the training part. With
    ``out_dir``, writes ``report.json``, ``confusion_matrix.png`` (the head's predictions)
    and ``umap.png`` (held-out cells' embeddings coloured by true label and by prediction;
    ``umap=False`` skips it) there. Accuracy and macro F1 use each method's top
    prediction; the head's "Unassigned" rate at ``threshold`` is reported beside them.
    """
    from scpretrain.evaluate.metrics import classification_metrics  # scikit-learn, only needed here

    read, fit = split_options("report", read, fit, options)  # a misspelt option stops here, before any work
    batch_size, device, verbose = read.batch_size, read.device, read.verbose
    model = as_export(model)
    labels, rows = labels_of(adata, label_key, name="adata")
    train, test = stratified_split(labels, test_size, seed)
    if len(test) == 0:
        raise EvaluateError(f"adata: no class of obs[{label_key!r}] has 2 or more cells, so none can be "
                            "held out; report needs several labelled cells per class")
    counts, cov = align_to_vocab(adata, model.vocab, layer=read.layer, name="adata", **read.align())
    counts = counts[rows]
    emb = embed_counts(model, counts, batch_size=batch_size, device=device)
    classes = sorted(set(labels.tolist()))
    y_tr, y_te = labels[train], labels[test]

    # the head's own validation cells (inside the training part) pick the mode: the test cells stay unseen
    _, va = stratified_split(y_tr, VAL_FRACTION, seed)
    clf, heldout, _ = fit_best_mode(model, counts[train], y_tr, va, head, mode, unfreeze, classes, seed=seed,
                                device=device, batch_size=batch_size, verbose=verbose, fit=fit)
    head_proba, _ = clf.predict(counts[test], batch_size=batch_size, device=device)
    head_pred = np.asarray(clf.classes)[head_proba.argmax(axis=1)]
    knn_p, knn_classes = knn_proba(emb[train], y_tr, emb[test], k=k)
    knn_pred = np.asarray(knn_classes)[knn_p.argmax(axis=1)]
    lr_pred = logreg_predict(counts[train], y_tr, counts[test], seed=seed)  # over the same genes
    values, n_per_class = np.unique(y_tr, return_counts=True)
    majority = str(values[n_per_class.argmax()])

    head_labels, _ = assign(head_proba, clf.classes, threshold)
    unassigned = float(np.mean(head_labels == UNASSIGNED)) if len(test) else 0.0
    methods = {
        "head": (f"{clf.describe()} ({model.embedding_key})", head_pred),
        "knn": (f"kNN (k={k}, cosine) on {model.embedding_key}", knn_pred),
        "logreg": (LOGREG, lr_pred),
        "majority": (f"majority class ({majority})", np.full(len(y_te), majority)),
    }
    rep: dict[str, Any] = {
        "export": str(model.path), "family": model.family, "label_key": label_key,
        "n_cells": int(len(labels)), "n_train": int(len(train)), "n_test": int(len(test)),
        "test_size": test_size, "seed": seed, "classes": classes, "coverage": cov.to_dict(),
        "head": clf.kind, "mode": clf.mode, "mode_choice": heldout, "head_training": clf.head.training_info,
        "head_unassigned_fraction": unassigned,
        "threshold": threshold,
        "methods": {name: {"description": desc, **classification_metrics(y_te, pred, classes)}
                    for name, (desc, pred) in methods.items()},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        title = f"{model.family} export, {clf.describe()}: held-out cells"
        files = write_pictures(out, emb[test], head_pred, title, truth=y_te, classes=classes, seed=seed,
                               umap=umap)
        rep["files"] = {"report": str(out / "report.json"), **files}
        (out / "report.json").write_text(json.dumps(rep, indent=2))
    return rep


def format_table(rep: dict[str, Any]) -> str:
    """The report as a small text table (one row per method)."""
    width = max(len(m["description"]) for m in rep["methods"].values())
    lines = [f"{rep['family']} export: {rep['n_train']} training / {rep['n_test']} held-out cells, "
             f"{len(rep['classes'])} classes of {rep['label_key']!r}, "
             f"gene coverage {rep['coverage']['fraction']:.1%}",
             f"{'method':<{width}}  accuracy  macro F1", f"{'-' * width}  --------  --------"]
    for m in rep["methods"].values():
        lines.append(f"{m['description']:<{width}}  {m['accuracy']:>8.3f}  {m['macro_f1']:>8.3f}")
    lines.append(f"head: {rep['head_unassigned_fraction']:.1%} of held-out cells Unassigned at threshold "
                 f"{rep['threshold']}")
    head, base = rep["methods"]["head"], rep["methods"]["logreg"]
    if base["macro_f1"] > head["macro_f1"] + 1e-9:
        lines.append(f"warning: the baseline beats the model on held-out cells (macro F1 {base['macro_f1']:.3f} vs "
                     f"{head['macro_f1']:.3f}): logistic regression on log-normalized expression labels these "
                     "cells better than this export")
    if "files" in rep:
        lines.append("wrote " + ", ".join(rep["files"].values()))
    return "\n".join(lines)
