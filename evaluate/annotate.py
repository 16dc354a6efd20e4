"""Annotate query cells: a fine-tuned head or kNN on the embeddings, with an "Unassigned" threshold."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evaluate.embedding import as_export, compute_embeddings
from evaluate.errors import EvaluateError
from evaluate.export_io import Export
from evaluate.finetune import export_info, fit_head, labels_of
from evaluate.heads import HEAD_KINDS, Head

UNASSIGNED = "Unassigned"


def assign(proba: np.ndarray, classes: list[str], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels, top probability): the most probable class, or "Unassigned" where it is below ``threshold``."""
    top = proba.argmax(axis=1)
    p = proba[np.arange(len(proba)), top].astype(np.float32)
    labels = np.asarray(classes, dtype=object)[top] if len(proba) else np.zeros(0, dtype=object)
    return np.where(p < threshold, UNASSIGNED, labels).astype(object), p


def knn_proba(ref_emb: np.ndarray, ref_labels: np.ndarray, query_emb: np.ndarray,
              k: int = 5) -> tuple[np.ndarray, list[str]]:
    """Vote fractions [n_query, n_classes] of the ``k`` nearest reference cells by cosine distance.

    No training: the zero-shot protocol of the MAE reference (k = 5). Ties between equally
    voted classes go to the class first in sorted order.
    """
    # imported here: scikit-learn adds about a second to `import evaluate`, and only kNN needs it
    from sklearn.neighbors import NearestNeighbors

    ref_labels = np.asarray(ref_labels).astype(str)
    classes = sorted(set(ref_labels.tolist()))
    k = min(k, len(ref_labels))
    if k < 1:
        raise EvaluateError("knn: the reference has no labelled cells")
    nn_index = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(ref_emb)
    _, idx = nn_index.kneighbors(query_emb)
    y = np.searchsorted(np.asarray(classes), ref_labels)[idx]  # [n_query, k] class indices
    proba = np.zeros((len(query_emb), len(classes)), dtype=np.float32)
    np.add.at(proba, (np.repeat(np.arange(len(query_emb)), k), y.ravel()), 1.0 / k)
    return proba, classes


def _write(adata: Any, label_key: str, labels: np.ndarray, prob: np.ndarray, classes: list[str]) -> None:
    cats = [c for c in classes if c != UNASSIGNED] + [UNASSIGNED]
    adata.obs[f"predicted_{label_key}"] = pd.Categorical(labels, categories=cats)
    adata.obs[f"predicted_{label_key}_probability"] = prob


def _resolve_head(head: str | Path | Head) -> str | Head:
    if isinstance(head, Head) or head in (*HEAD_KINDS, "knn"):
        return head
    if Path(head).is_dir():
        return Head.load(head)
    raise EvaluateError(f"head: {head!r} is not one of {(*HEAD_KINDS, 'knn')} nor a directory with a saved "
                        "head (head.json + head.safetensors)")


def annotate(
    model: Export | str | Path,
    adata: Any,
    reference: Any = None,
    label_key: str = "cell_type",
    threshold: float = 0.5,
    head: str | Path | Head = "linear",
    *,
    k: int = 5,
    layer: str | None = None,
    reference_layer: str | None = None,
    min_coverage: float = 0.5,
    batch_size: int = 512,
    device: str | None = None,
    seed: int = 0,
    save_head: str | Path | None = None,
    verbose: bool = True,
    **fit_kwargs: Any,
) -> Any:
    """Label the cells of ``adata`` from the labelled ``reference``; returns ``adata``.

    ``head``: "linear" or "mlp" fine-tune a head on the reference's embeddings (the
    encoder stays frozen; ``fit_kwargs`` go to ``finetune.fit_head``; ``save_head``
    keeps it); "knn" votes among the ``k`` nearest reference cells (cosine) without
    training; a ``Head`` or the directory of a saved head is used as is (then no
    reference is needed). Writes ``adata.obs["predicted_<label_key>"]`` ("Unassigned"
    where the top probability is below ``threshold``),
    ``adata.obs["predicted_<label_key>_probability"]`` and the query embedding in
    ``adata.obsm["X_<family>"]``.
    """
    model = as_export(model)
    head = _resolve_head(head)
    if not 0.0 <= threshold <= 1.0:
        raise EvaluateError(f"threshold must be in [0, 1], got {threshold}")
    emb_args = dict(batch_size=batch_size, min_coverage=min_coverage, device=device, verbose=verbose)
    trained = head if isinstance(head, Head) else None
    if trained is not None:
        trained.check_compatible(model)
    elif reference is None:
        raise EvaluateError(f"annotate: head={head!r} needs a labelled reference (or pass a saved head)")
    else:
        labels, rows = labels_of(reference, label_key)  # before any embedding: a wrong key fails fast
    query_emb, cov = compute_embeddings(model, adata, layer=layer, name="query", **emb_args)
    if trained is None:
        ref_emb, _ = compute_embeddings(model, reference, layer=reference_layer, name="reference", **emb_args)
        ref_emb = ref_emb[rows]
        if head == "knn":
            proba, classes = knn_proba(ref_emb, labels, query_emb, k=k)
        else:
            trained = fit_head(ref_emb, labels, kind=head, seed=seed, export_info=export_info(model),
                               **fit_kwargs)
            if save_head is not None:
                trained.save(save_head)
    if trained is not None:
        proba, classes = trained.predict_proba(query_emb), trained.classes
    pred, prob = assign(proba, classes, threshold)
    _write(adata, label_key, pred, prob, classes)
    adata.obsm[model.embedding_key] = query_emb
    adata.uns["evaluate"] = {
        "export": str(model.path), "family": model.family, "vocab_sha256": model.vocab_sha256,
        "coverage": cov.to_dict(), "head": head if isinstance(head, str) else head.kind,
        "threshold": threshold}
    if verbose:
        n_un = int((pred == UNASSIGNED).sum())
        print(f"annotated {len(pred):,} cells into {len(classes)} classes; {n_un:,} Unassigned "
              f"(top probability < {threshold})")
    return adata
