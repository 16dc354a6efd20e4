"""Embed the cells of an AnnData with a loaded export."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from scpretrain.evaluate.align import Coverage, align_to_vocab
from scpretrain.evaluate.export_io import Export, load_export
from scpretrain.evaluate.options import ReadOptions, split_options


def as_export(model: Export | str | Path) -> Export:
    """Accept a loaded Export or the path of an export directory."""
    return model if isinstance(model, Export) else load_export(model)


def pick_device(device: str | torch.device | None) -> torch.device:
    """``device`` as given, else cuda when available, else cpu."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def embed_counts(model: Export, counts: sp.csr_matrix, batch_size: int = 512,
                 device: str | torch.device | None = None) -> np.ndarray:
    """Embeddings [n, d] (float32) of raw counts already aligned to the export's vocabulary."""
    model.module.to(pick_device(device))
    chunks = []
    # Densify one batch at a time: the aligned CSR stays the only full-size copy in memory.
    for start in range(0, counts.shape[0], batch_size):
        dense = torch.from_numpy(counts[start:start + batch_size].toarray())
        chunks.append(model.encode_counts(dense).numpy())
    dim = chunks[0].shape[1] if chunks else 0
    return np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)


def compute_embeddings(
    model: Export,
    adata: Any,
    batch_size: int = 512,
    layer: str | None = None,
    min_coverage: float = 0.5,
    device: str | torch.device | None = None,
    name: str = "adata",
    verbose: bool = True,
    **align_kw: Any,
) -> tuple[np.ndarray, Coverage]:
    """Embeddings [n_obs, d] (float32 numpy) and the gene coverage; ``adata`` is left unchanged.

    ``align_kw``: ``allow_normalized``, ``sum_duplicates`` (see ``evaluate.align.align_to_vocab``)."""
    counts, cov = align_to_vocab(adata, model.vocab, min_coverage=min_coverage, layer=layer, name=name,
                                 verbose=verbose, **align_kw)
    return embed_counts(model, counts, batch_size=batch_size, device=device), cov


def embed(model: Export | str | Path, adata: Any, *, read: ReadOptions | None = None, **options: Any) -> Any:
    """Write ``adata.obsm["X_<family>"]`` (float32 [n_obs, d]) from raw counts; returns ``adata``.

    Counts come from ``adata.X`` (sparse or dense), ``adata.layers[layer]`` or, with
    ``layer="raw"``, ``adata.raw``. Genes are aligned to the export's vocabulary first
    (see ``evaluate.align``); below ``min_coverage`` the call is refused. The coverage
    is also stored in ``adata.uns["evaluate"]``. ``read``: ``evaluate.ReadOptions`` (or its fields as
    keyword arguments: ``layer``, ``min_coverage``, ``batch_size``, ``device``, ``verbose``, ...).
    """
    read, _ = split_options("embed", read, None, options, fits=False)
    model = as_export(model)
    emb, cov = compute_embeddings(model, adata, batch_size=read.batch_size, layer=read.layer,
                                  device=read.device, **read.align())
    adata.obsm[model.embedding_key] = emb
    adata.uns["evaluate"] = {"export": str(model.path), "family": model.family,
                             "vocab_sha256": model.vocab_sha256, "coverage": cov.to_dict()}
    return adata
