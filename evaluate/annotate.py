"""Annotate query cells: a fine-tuned classifier or kNN on the embeddings, with an "Unassigned" threshold."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scpretrain.evaluate.align import align_to_vocab
from scpretrain.evaluate.embedding import as_export, embed_counts
from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.export_io import Export
from scpretrain.evaluate.metrics import UNASSIGNED  # noqa: F401 - re-exported: annotate's public label
from scpretrain.evaluate.options import FitOptions, ReadOptions, split_options

KNN_RADIUS_QUANTILE = 0.99


def assign(proba: np.ndarray, classes: list[str], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels, top probability): the most probable class, or "Unassigned" where it is below ``threshold``."""
    top = proba.argmax(axis=1)
    p = proba[np.arange(len(proba)), top].astype(np.float32)
    labels = np.asarray(classes, dtype=object)[top] if len(proba) else np.zeros(0, dtype=object)
    return np.where(p < threshold, UNASSIGNED, labels).astype(object), p


def reference_radius(ref_emb: np.ndarray, k: int = 5, quantile: float = KNN_RADIUS_QUANTILE) -> float:
    """The ``quantile`` of the reference cells' cosine distance to their k-th nearest other reference cell.

    A query cell's neighbour farther than this is farther than almost any reference cell is from
    its own neighbourhood: it is not evidence that the query is of the neighbour's type.
    """
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(ref_emb) - 1)
    if k < 1:
        return float("inf")
    # kneighbors() without a query leaves each cell itself out
    dist, _ = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(ref_emb).kneighbors()
    return float(np.quantile(dist[:, -1], quantile))


def knn_proba(ref_emb: np.ndarray, ref_labels: np.ndarray, query_emb: np.ndarray | None, k: int = 5,
              max_distance: float | str | None = None) -> tuple[np.ndarray, list[str]]:
    """Vote fractions [n_query, n_classes] of the ``k`` nearest reference cells by cosine distance.

    No training: the zero-shot protocol of the MAE reference (k = 5). Ties between equally
    voted classes go to the class first in sorted order. ``max_distance``: neighbours
    farther than this cosine distance do not vote (their share of the ``k`` votes is
    lost), so a cell unlike any reference cell gets low vote fractions and becomes
    "Unassigned"; "auto" takes :func:`reference_radius`; None lets every neighbour vote.
    ``query_emb=None``: leave-one-out on the reference (each cell voted on by the others).
    """
    # imported here: scikit-learn adds about a second to `import evaluate`, and only kNN needs it
    from sklearn.neighbors import NearestNeighbors

    ref_labels = np.asarray(ref_labels).astype(str)
    classes = sorted(set(ref_labels.tolist()))
    k = min(k, len(ref_labels) - (query_emb is None))
    if k < 1:
        raise EvaluateError("knn: the reference has too few labelled cells")
    nn_index = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(ref_emb)
    dist, idx = nn_index.kneighbors(query_emb)  # None: each reference cell's neighbours, itself left out
    y = np.searchsorted(np.asarray(classes), ref_labels)[idx]  # [n_query, k] class indices
    votes = np.full(dist.shape, 1.0 / k, dtype=np.float32)
    if max_distance is not None:
        radius = reference_radius(ref_emb, k) if max_distance == "auto" else float(max_distance)
        votes[dist > radius] = 0.0
    n = len(dist)
    proba = np.zeros((n, len(classes)), dtype=np.float32)
    np.add.at(proba, (np.repeat(np.arange(n), k), y.ravel()), votes.ravel())
    return proba, classes


def _write(adata: Any, label_key: str, labels: np.ndarray, prob: np.ndarray, classes: list[str]) -> None:
    cats = [c for c in classes if c != UNASSIGNED] + [UNASSIGNED]
    adata.obs[f"predicted_{label_key}"] = pd.Categorical(labels, categories=cats)
    adata.obs[f"predicted_{label_key}_probability"] = prob


def write_pictures(out_dir: str | Path, embedding: np.ndarray, predicted: np.ndarray, title: str,
                   truth: np.ndarray | None = None, classes: list[str] | None = None, seed: int = 0,
                   umap: bool = True) -> dict[str, str]:
    """umap.png (coloured by prediction, and by truth when given) and, with truth, confusion_matrix.png."""
    from scpretrain.evaluate.plots import (  # matplotlib only when asked
        plot_confusion,
        plot_umap,
        umap_coordinates,
    )

    out = Path(out_dir)
    files: dict[str, str] = {}
    if truth is not None:
        files["confusion_matrix"] = str(plot_confusion(truth, predicted, out / "confusion_matrix.png",
                                                       labels=classes, title=title))
    if umap and len(embedding) >= 4:
        colourings = {"predicted": predicted} if truth is None else {"true": truth, "predicted": predicted}
        files["umap"] = str(plot_umap(umap_coordinates(embedding, seed=seed), colourings, out / "umap.png",
                                      title=title))
    return files


def _resolve_head(head: Any) -> Any:
    from scpretrain.evaluate.classifier import Classifier
    from scpretrain.evaluate.heads import HEAD_KINDS, Head

    if isinstance(head, (Head, Classifier)) or head in ("auto", *HEAD_KINDS, "knn"):
        return head
    if Path(head).is_dir():
        return Path(head)
    raise EvaluateError(f"head: {head!r} is not one of {('auto', *HEAD_KINDS, 'knn')} nor a directory with a "
                        "saved head (head.json + head.safetensors)")


REJECT_RATE = 0.05  # default: at most this share of held-out known reference cells become "Unassigned"
VAL_FRACTION = 0.15  # of each reference class: early stopping, the mode choice, calibration, the baseline
# --mode auto tries these (mode, head) per family and keeps the best on held-out reference cells
AUTO_CANDIDATES = {"mae": (("frozen", "auto"), ("full", "auto")),
                   "performer": (("frozen", "auto"), ("partial", "auto"))}


def calibrate_threshold(top_p: np.ndarray, reject_rate: float) -> float:
    """The largest threshold that rejects at most ``reject_rate`` of these (held-out, known) cells.

    A cell is rejected when its top probability is strictly below the threshold, so the
    threshold is one of the observed values (or 0): vote fractions are discrete, and a
    quantile between two of them could reject far more than asked.
    """
    if not 0.0 <= reject_rate < 1.0:
        raise EvaluateError(f"reject_rate must be in [0, 1), got {reject_rate}")
    if len(top_p) == 0:
        return 0.0
    v = np.sort(np.asarray(top_p, dtype=np.float64))
    allowed = int(np.floor(reject_rate * len(v) + 1e-9))  # cells that may fall below
    return float(v[allowed]) if allowed < len(v) else float(v[-1])


def _heldout_scores(y_true: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, float]:
    from scpretrain.evaluate.metrics import classification_metrics

    m = classification_metrics(y_true, pred, classes)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n": m["n"]}


def _sklearn_guard(what: str, fn: Any, *args: Any, **kw: Any) -> Any:
    """scikit-learn's ValueErrors (a class with too few cells, NaN that slipped through) as one-line errors."""
    try:
        return fn(*args, **kw)
    except ValueError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvaluateError(f"{what}: scikit-learn refused the data ({first}); check the labels (every class "
                            "needs cells) and that the counts are finite") from e


# long: one straight sequence users can follow (check inputs, align, fit or load the head, predict, threshold,
# compare with the baseline, plot); each step is a call, the length is the argument checks.
def annotate(
    model: Export | str | Path,
    adata: Any,
    reference: Any = None,
    label_key: str = "cell_type",
    threshold: float | str | None = "auto",
    head: Any = "auto",
    *,
    mode: str = "auto",
    unfreeze: int | list[int] = 1,
    reject_rate: float = REJECT_RATE,
    k: int = 5,
    max_distance: float | str | None = "auto",
    reference_layer: str | None = None,
    compare_baseline: bool = True,
    seed: int = 0,
    save_head: str | Path | None = None,
    plot_dir: str | Path | None = None,
    read: ReadOptions | None = None,
    fit: FitOptions | None = None,
    **options: Any,
) -> Any:
    """Label the cells of ``adata`` from the labelled ``reference``; returns ``adata``.

    ``head``: "auto" / "linear" / "mlp" / "scbert" fine-tune a classifier on the reference
    (``mode`` "auto" (default: the candidates of ``AUTO_CANDIDATES`` are each fitted and
    the best macro F1 on held-out reference cells is kept), "frozen", "partial" or "full",
    ``unfreeze``; ``read`` (``evaluate.ReadOptions``: layer, min_coverage, batch_size, device, ...) reads the
    query (the reference from ``reference_layer``), ``fit`` (``evaluate.FitOptions``; both also as keyword
    arguments) trains it, e.g.
    ``loss="gaussian_inflation", hard_mining=True`` for rare types; ``save_head`` keeps it);
    "knn" votes among the ``k`` nearest reference cells (cosine) without training; a
    Classifier, a Head or the directory of a saved head is used as is (then no reference
    is needed).

    Held-out reference cells (``VAL_FRACTION`` of each class; they also stop the training
    early) calibrate "Unassigned": ``threshold="auto"`` is the largest top probability that
    rejects at most ``reject_rate`` of them; a number is used as it is; None (CLI
    ``--no-unassigned``) rejects nothing. The same cells score the model and, with
    ``compare_baseline``, logistic regression on log-normalized expression over the same
    genes (``evaluate.baseline``); a warning says so when the baseline is better. Both go
    to ``adata.uns["evaluate"]``.

    Writes ``adata.obs["predicted_<label_key>"]``, ``..._probability``, the export's
    embedding in ``adata.obsm["X_<family>"]`` and, when the encoder was fine-tuned, the
    fine-tuned one in ``adata.obsm["X_<family>_finetuned"]``. Query cells with no counts
    over the export's genes are dropped (reported): the returned AnnData is then a copy
    without them. With ``plot_dir``: umap.png (and confusion_matrix.png when the query
    has ``obs[label_key]``).
    """
    from scpretrain.evaluate.align import nonempty_cells
    from scpretrain.evaluate.baseline import LogRegBaseline
    from scpretrain.evaluate.classifier import as_classifier
    from scpretrain.evaluate.finetune import labels_of, stratified_split

    read, fit = split_options("annotate", read, fit, options)  # a misspelt option stops here, before any work
    layer, batch_size, device, verbose = read.layer, read.batch_size, read.device, read.verbose

    model = as_export(model)
    head = _resolve_head(head)
    if isinstance(threshold, (int, float)) and not 0.0 <= threshold <= 1.0:
        raise EvaluateError(f"threshold must be in [0, 1], 'auto' or None, got {threshold}")
    if isinstance(threshold, str) and threshold != "auto":
        raise EvaluateError(f"threshold must be a number in [0, 1], 'auto' or None, got {threshold!r}")
    clf = None
    if not isinstance(head, str):
        clf = as_classifier(head, model)
        if threshold == "auto":  # nothing to calibrate on: the threshold saved with the head, else 0.5
            threshold = (getattr(clf.head, "fine_tuning", None) or {}).get("threshold", 0.5)
    elif reference is None:
        raise EvaluateError(f"annotate: head={head!r} needs a labelled reference (or pass a saved head)")
    else:
        labels, rows = labels_of(reference, label_key)  # before any embedding: a wrong key fails fast
    align = read.align()
    query, cov = align_to_vocab(adata, model.vocab, layer=layer, name="query", **align)
    keep = nonempty_cells(query, "query", verbose)
    n_dropped = query.shape[0] - len(keep)
    if n_dropped:
        adata, query = adata[keep].copy(), query[keep]
    query_emb, heldout, calibration = None, None, None
    if clf is None:
        ref, _ = align_to_vocab(reference, model.vocab, layer=reference_layer, name="reference", **align)
        ref = ref[rows]
        nz = nonempty_cells(ref, "reference", verbose)
        ref, labels = ref[nz], labels[nz]
        classes_ref = sorted(set(labels.tolist()))
        tr, va = stratified_split(labels, VAL_FRACTION, seed)
        if head == "knn":  # no training: every reference cell is held out once (voted on by the others)
            ref_emb = embed_counts(model, ref, batch_size=batch_size, device=device)
            loo, loo_classes = _sklearn_guard("knn", knn_proba, ref_emb, labels, None, k=k,
                                              max_distance=max_distance)
            heldout = {"model": _heldout_scores(labels[va], np.asarray(loo_classes)[loo[va].argmax(1)],
                                                classes_ref)}
            val_top = loo.max(axis=1)
            query_emb = embed_counts(model, query, batch_size=batch_size, device=device)
            proba, classes = _sklearn_guard("knn", knn_proba, ref_emb, labels, query_emb, k=k,
                                            max_distance=max_distance)
        else:
            clf, heldout, val_top = fit_best_mode(model, ref, labels, va, head, mode, unfreeze, classes_ref,
                                              seed=seed, device=device, batch_size=batch_size,
                                              verbose=verbose, fit=fit)
        if compare_baseline and len(va):
            base = _sklearn_guard("baseline", LogRegBaseline(seed=seed).fit, ref[tr], labels[tr])
            heldout["baseline"] = _heldout_scores(labels[va], base.predict(ref[va]), classes_ref)
        heldout["n_heldout"] = int(len(va))
        if threshold == "auto":
            threshold = calibrate_threshold(val_top, reject_rate)
            calibration = {"method": "leave-one-out reference cells" if head == "knn" else
                           "held-out reference cells", "target_reject_rate": reject_rate,
                           "n_cells": int(len(val_top)), "threshold": threshold,
                           "heldout_reject_rate": float(np.mean(val_top < threshold)) if len(val_top) else 0.0}
        if clf is not None and save_head is not None:
            clf.head.fine_tuning["threshold"] = threshold  # --load-head reuses the calibrated threshold
            clf.save(save_head)
    if clf is not None:
        proba, own_emb = clf.predict(query, batch_size=batch_size, device=device)
        classes = clf.classes
        if clf.mode == "frozen":
            query_emb = own_emb  # the export's encoder: the same numbers evaluate.embed writes
        else:
            adata.obsm[f"{model.embedding_key}_finetuned"] = own_emb
            query_emb = embed_counts(model, query, batch_size=batch_size, device=device)
    pred, prob = assign(proba, classes, 0.0 if threshold is None else threshold)
    _write(adata, label_key, pred, prob, classes)
    adata.obsm[model.embedding_key] = query_emb
    method = "knn" if clf is None else clf.describe()
    adata.uns["evaluate"] = {
        "export": str(model.path), "family": model.family, "vocab_sha256": model.vocab_sha256,
        "coverage": cov.to_dict(), "head": "knn" if clf is None else clf.kind,
        "mode": None if clf is None else clf.mode,
        "threshold": -1.0 if threshold is None else float(threshold),  # -1: rejection off (h5ad has no None)
        "n_dropped_empty": int(n_dropped)}
    if calibration is not None:
        adata.uns["evaluate"]["calibration"] = calibration
    if heldout is not None:
        adata.uns["evaluate"]["heldout"] = heldout
    if plot_dir is not None:
        truth = None
        if label_key in adata.obs.columns and not adata.obs[label_key].isna().all():
            col = adata.obs[label_key]
            truth = np.where(col.isna().to_numpy(), "unlabelled", col.astype(str).to_numpy())
        files = write_pictures(plot_dir, query_emb, pred.astype(str), f"{model.family} export, {method}",
                               truth=truth, seed=seed)
        adata.uns["evaluate"]["files"] = files
        if verbose:
            print("wrote " + ", ".join(files.values()))
    if verbose:
        for line in summary_lines(adata.uns["evaluate"], method, len(pred), int((pred == UNASSIGNED).sum()),
                                  len(classes)):
            print(line)
    return adata


def fit_best_mode(model: Export, ref: Any, labels: np.ndarray, va: np.ndarray, head: str, mode: str,
              unfreeze: Any, classes: list[str], *, seed: int, device: str | None, batch_size: int,
              verbose: bool, fit: FitOptions) -> tuple[Any, dict, np.ndarray]:
    """Fit the classifier (each ``AUTO_CANDIDATES`` entry for mode "auto") on the reference; score each on the
    held-out cells ``va`` (the fit's own validation split: same labels, seed and fraction); keep the best.

    Returns (classifier, held-out scores, the kept classifier's top probabilities on ``va``).
    """
    from scpretrain.evaluate.finetune import fit_classifier

    cands = AUTO_CANDIDATES[model.family] if mode == "auto" else ((mode, head),)
    if mode == "auto" and head != "auto":
        cands = tuple((m, head) for m, _ in cands)
    best, scores = None, {}
    for m, h in cands:
        clf = fit_classifier(model, ref, labels, h, m, unfreeze, seed=seed, device=device, batch_size=batch_size,
                             fit=replace(fit, val_fraction=VAL_FRACTION))
        proba, _ = clf.predict(ref[va], batch_size=batch_size, device=device)
        pred = np.asarray(clf.classes)[proba.argmax(axis=1)] if len(va) else np.zeros(0, dtype=str)
        sc = _heldout_scores(labels[va], pred, classes)
        scores[clf.describe()] = sc
        if verbose and len(cands) > 1:
            print(f"mode auto: {clf.describe()}: held-out reference macro F1 {sc['macro_f1']:.3f}, "
                  f"accuracy {sc['accuracy']:.3f}")
        if best is None or sc["macro_f1"] > best[1]["macro_f1"] + 1e-9:
            best = (clf, sc, proba.max(axis=1) if len(va) else np.zeros(0))
    clf, sc, top = best
    heldout = {"model": sc, "candidates": scores} if len(cands) > 1 else {"model": sc}
    return clf, heldout, top


def summary_lines(info: dict, method: str, n: int, n_unassigned: int, n_classes: int) -> list[str]:
    """What the CLI prints after annotating: the result, the calibration and the model against the baseline."""
    thr = info["threshold"]
    rule = "rejection off" if thr < 0 else f"top probability < {thr:.3g}"
    lines = [f"annotated {n:,} cells into {n_classes} classes with {method}; {n_unassigned:,} "
             f"({n_unassigned / max(n, 1):.1%}) Unassigned ({rule})"]
    cal = info.get("calibration")
    if cal:
        lines.append(f"threshold {cal['threshold']:.3g} calibrated on {cal['n_cells']:,} held-out reference cells: "
                     f"rejects {cal['heldout_reject_rate']:.1%} of them (target <= {cal['target_reject_rate']:.0%})")
    ho = info.get("heldout")
    if ho and ho.get("n_heldout"):
        m = ho["model"]
        text = (f"held-out reference cells ({ho['n_heldout']:,}): model accuracy {m['accuracy']:.3f}, "
                f"macro F1 {m['macro_f1']:.3f}")
        b = ho.get("baseline")
        if b:
            text += f"; logistic regression baseline accuracy {b['accuracy']:.3f}, macro F1 {b['macro_f1']:.3f}"
        lines.append(text)
        if b and b["macro_f1"] > m["macro_f1"] + 1e-9:
            lines.append(f"warning: the baseline beats the model on held-out reference cells (macro F1 "
                         f"{b['macro_f1']:.3f} vs {m['macro_f1']:.3f}): logistic regression on log-normalized "
                         "expression labels these cells better than this export")
    return lines
