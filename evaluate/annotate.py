"""Annotate query cells: a fine-tuned classifier or kNN on the embeddings, with an "Unassigned" threshold."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evaluate.align import align_to_vocab
from evaluate.embedding import as_export, embed_counts
from evaluate.errors import EvaluateError
from evaluate.export_io import Export

UNASSIGNED = "Unassigned"
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


def knn_proba(ref_emb: np.ndarray, ref_labels: np.ndarray, query_emb: np.ndarray, k: int = 5,
              max_distance: float | str | None = None) -> tuple[np.ndarray, list[str]]:
    """Vote fractions [n_query, n_classes] of the ``k`` nearest reference cells by cosine distance.

    No training: the zero-shot protocol of the MAE reference (k = 5). Ties between equally
    voted classes go to the class first in sorted order. ``max_distance``: neighbours
    farther than this cosine distance do not vote (their share of the ``k`` votes is
    lost), so a cell unlike any reference cell gets low vote fractions and becomes
    "Unassigned"; "auto" takes :func:`reference_radius`; None lets every neighbour vote.
    """
    # imported here: scikit-learn adds about a second to `import evaluate`, and only kNN needs it
    from sklearn.neighbors import NearestNeighbors

    ref_labels = np.asarray(ref_labels).astype(str)
    classes = sorted(set(ref_labels.tolist()))
    k = min(k, len(ref_labels))
    if k < 1:
        raise EvaluateError("knn: the reference has no labelled cells")
    nn_index = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(ref_emb)
    dist, idx = nn_index.kneighbors(query_emb)
    y = np.searchsorted(np.asarray(classes), ref_labels)[idx]  # [n_query, k] class indices
    votes = np.full(dist.shape, 1.0 / k, dtype=np.float32)
    if max_distance is not None:
        radius = reference_radius(ref_emb, k) if max_distance == "auto" else float(max_distance)
        votes[dist > radius] = 0.0
    proba = np.zeros((len(query_emb), len(classes)), dtype=np.float32)
    np.add.at(proba, (np.repeat(np.arange(len(query_emb)), k), y.ravel()), votes.ravel())
    return proba, classes


def _write(adata: Any, label_key: str, labels: np.ndarray, prob: np.ndarray, classes: list[str]) -> None:
    cats = [c for c in classes if c != UNASSIGNED] + [UNASSIGNED]
    adata.obs[f"predicted_{label_key}"] = pd.Categorical(labels, categories=cats)
    adata.obs[f"predicted_{label_key}_probability"] = prob


def write_pictures(out_dir: str | Path, embedding: np.ndarray, predicted: np.ndarray, title: str,
                   truth: np.ndarray | None = None, classes: list[str] | None = None, seed: int = 0,
                   umap: bool = True) -> dict[str, str]:
    """umap.png (coloured by prediction, and by truth when given) and, with truth, confusion_matrix.png."""
    from evaluate.plots import plot_confusion, plot_umap, umap_coordinates  # matplotlib only when asked

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
    from evaluate.classifier import Classifier
    from evaluate.heads import HEAD_KINDS, Head

    if isinstance(head, (Head, Classifier)) or head in ("auto", *HEAD_KINDS, "knn"):
        return head
    if Path(head).is_dir():
        return Path(head)
    raise EvaluateError(f"head: {head!r} is not one of {('auto', *HEAD_KINDS, 'knn')} nor a directory with a "
                        "saved head (head.json + head.safetensors)")


def annotate(
    model: Export | str | Path,
    adata: Any,
    reference: Any = None,
    label_key: str = "cell_type",
    threshold: float = 0.5,
    head: Any = "auto",
    *,
    mode: str = "frozen",
    unfreeze: int | list[int] = 1,
    k: int = 5,
    max_distance: float | str | None = "auto",
    layer: str | None = None,
    reference_layer: str | None = None,
    min_coverage: float = 0.5,
    batch_size: int = 512,
    device: str | None = None,
    seed: int = 0,
    save_head: str | Path | None = None,
    plot_dir: str | Path | None = None,
    verbose: bool = True,
    **fit_kwargs: Any,
) -> Any:
    """Label the cells of ``adata`` from the labelled ``reference``; returns ``adata``.

    ``head``: "auto" / "linear" / "mlp" / "scbert" fine-tune a classifier on the reference
    (``mode`` "frozen", "partial" or "full", ``unfreeze``; ``fit_kwargs`` go to
    ``finetune.fit_classifier``, e.g. ``loss="gaussian_inflation", hard_mining=True`` for rare
    types, see ``evaluate.longtail``; ``save_head`` keeps it); "knn" votes among the ``k``
    nearest reference cells (cosine) without training, neighbours farther than
    ``max_distance`` not voting ("auto": the reference's own 99th-percentile neighbour
    distance), so cells of a type the reference lacks come out "Unassigned"; a
    Classifier, a Head or the directory of a saved head is used as is (then no reference
    is needed). Writes ``adata.obs["predicted_<label_key>"]`` ("Unassigned" where the top
    probability is below ``threshold``), ``adata.obs["predicted_<label_key>_probability"]``,
    the export's embedding in ``adata.obsm["X_<family>"]`` and, when the encoder was
    fine-tuned, the fine-tuned one in ``adata.obsm["X_<family>_finetuned"]``. With
    ``plot_dir``: umap.png coloured by prediction (and by ``obs[label_key]`` when the
    query has it, then also confusion_matrix.png).
    """
    from evaluate.classifier import as_classifier
    from evaluate.finetune import fit_classifier, labels_of

    model = as_export(model)
    head = _resolve_head(head)
    if not 0.0 <= threshold <= 1.0:
        raise EvaluateError(f"threshold must be in [0, 1], got {threshold}")
    clf = None
    if not isinstance(head, str):
        clf = as_classifier(head, model)
    elif reference is None:
        raise EvaluateError(f"annotate: head={head!r} needs a labelled reference (or pass a saved head)")
    else:
        labels, rows = labels_of(reference, label_key)  # before any embedding: a wrong key fails fast
    align = dict(min_coverage=min_coverage, verbose=verbose)
    query, cov = align_to_vocab(adata, model.vocab, layer=layer, name="query", **align)
    query_emb = None
    if clf is None:
        ref, _ = align_to_vocab(reference, model.vocab, layer=reference_layer, name="reference", **align)
        ref = ref[rows]
        if head == "knn":
            query_emb = embed_counts(model, query, batch_size=batch_size, device=device)
            ref_emb = embed_counts(model, ref, batch_size=batch_size, device=device)
            proba, classes = knn_proba(ref_emb, labels, query_emb, k=k, max_distance=max_distance)
        else:
            clf = fit_classifier(model, ref, labels, head, mode, unfreeze, seed=seed, device=device,
                                 batch_size=batch_size, **fit_kwargs)
            if save_head is not None:
                clf.save(save_head)
    if clf is not None:
        proba, own_emb = clf.predict(query, batch_size=batch_size, device=device)
        classes = clf.classes
        if clf.mode == "frozen":
            query_emb = own_emb  # the export's encoder: the same numbers evaluate.embed writes
        else:
            adata.obsm[f"{model.embedding_key}_finetuned"] = own_emb
            query_emb = embed_counts(model, query, batch_size=batch_size, device=device)
    pred, prob = assign(proba, classes, threshold)
    _write(adata, label_key, pred, prob, classes)
    adata.obsm[model.embedding_key] = query_emb
    method = "knn" if clf is None else clf.describe()
    adata.uns["evaluate"] = {
        "export": str(model.path), "family": model.family, "vocab_sha256": model.vocab_sha256,
        "coverage": cov.to_dict(), "head": "knn" if clf is None else clf.kind,
        "mode": None if clf is None else clf.mode, "threshold": threshold}
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
        n_un = int((pred == UNASSIGNED).sum())
        print(f"annotated {len(pred):,} cells into {len(classes)} classes with {method}; {n_un:,} Unassigned "
              f"(top probability < {threshold})")
    return adata
