"""External gene identity embeddings (gene2vec, GenePT-style text embeddings) aligned to a corpus vocabulary.

Formats:
- word2vec text: an optional header line ``"<n> <dim>"``, then ``"GENE v1 v2 ..."`` per line;
- ``.npy`` [n, width] plus a gene list (one name per line, same order): ``genes_file`` or, by
  default, ``<stem>.genes.txt`` next to the ``.npy``.

Names are matched to the vocabulary by gene id (Ensembl versions stripped) or by symbol,
whichever matches more; genes the file lacks get seeded random vectors with the matched rows'
per-dimension mean and standard deviation, so they look like real rows in scale. The result is
float32 (the scBERT reference left gene2vec float64). A width other than the model's is either
projected once here by a fixed seeded Gaussian matrix (``fit_width``) or kept and mapped by the
Performer's learned ``gene_proj`` (``gene_embedding_dim``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scpretrain.scmodels.genes import normalize_gene_id as strip_version
from scpretrain.scmodels.vectors import read_vectors


@dataclass
class GeneEmbedding:
    weights: torch.Tensor  # float32 [n_genes, width], vocabulary order
    matched: int
    key: str  # "gene_id" | "symbol": the vocabulary column the file's names matched
    source: str
    missing: list[str] = field(default_factory=list)  # vocabulary genes initialised at random

    @property
    def coverage(self) -> float:
        return self.matched / max(self.weights.shape[0], 1)

    def report(self) -> str:
        n = self.weights.shape[0]
        miss = f"; e.g. {', '.join(self.missing[:5])}" if self.missing else ""
        return (f"{self.source}: {self.matched:,} of {n:,} vocabulary genes matched by {self.key} "
                f"({100 * self.coverage:.1f}%), width {self.weights.shape[1]}; "
                f"{n - self.matched:,} initialised at random{miss}")


def read_embedding_file(path: str | Path, genes_file: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """Gene names and their vectors [n, width] (float32): word2vec text, a TSV, JSON, or a .npy with its gene
    list (``model.gene_embedding_genes``, default ``<stem>.genes.txt``), read by ``scmodels.vectors``."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: gene embedding file not found; fix model.gene_embedding")
    return read_vectors(path, genes_file)


def align_names(names: list[str], vocab: list[tuple[str, str]]) -> tuple[np.ndarray, str]:
    """For each vocabulary column, the row of ``names`` naming it (-1 if none), matching by gene id
    (versions stripped) or symbol, whichever matches more. The first occurrence of a name wins."""
    best: tuple[int, str, np.ndarray] | None = None
    for key, col in (("gene_id", 0), ("symbol", 1)):
        norm = strip_version if key == "gene_id" else (lambda s: s)
        row_of: dict[str, int] = {}
        for i, n in enumerate(names):
            row_of.setdefault(norm(n), i)
        idx = np.array([row_of.get(norm(g[col]), -1) for g in vocab], dtype=np.int64)
        hits = int((idx >= 0).sum())
        if best is None or hits > best[0]:
            best = (hits, key, idx)
    return best[2], best[1]


def load_gene_embedding(path: str | Path, vocab: list[tuple[str, str]] | str | Path, *,
                        genes_file: str | Path | None = None, seed: int = 0) -> GeneEmbedding:
    """Read ``path`` and align it to ``vocab`` ([(gene_id, symbol)] or a corpus directory / vocab.tsv).

    Deterministic in ``seed`` (the random rows of unmatched genes); every rank gets the same matrix.
    """
    if isinstance(vocab, (str, Path)):
        from scpretrain.sharding.manifest import read_vocab

        vocab = read_vocab(vocab)
    names, mat = read_embedding_file(path, genes_file)
    idx, key = align_names(names, vocab)
    hit = idx >= 0
    if not hit.any():
        raise ValueError(f"{path}: none of its {len(names):,} gene names (e.g. {', '.join(names[:3])}) match the "
                         f"vocabulary's gene ids or symbols (e.g. {vocab[0][0]}, {vocab[0][1]}); "
                         "use an embedding file for the same species and naming")
    matched = torch.from_numpy(mat[idx[hit]])
    out = torch.empty(len(vocab), mat.shape[1], dtype=torch.float32)
    out[torch.from_numpy(hit)] = matched
    if (~hit).any():
        gen = torch.Generator().manual_seed(seed)
        mean = matched.mean(0)
        std = matched.std(0) if matched.shape[0] > 1 else torch.ones_like(mean)
        out[torch.from_numpy(~hit)] = mean + std * torch.randn(int((~hit).sum()), mat.shape[1], generator=gen)
    missing = [vocab[j][1] or vocab[j][0] for j in np.flatnonzero(~hit)]
    return GeneEmbedding(out, int(hit.sum()), key, str(path), missing)


def fit_width(weights: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """[n, width] -> [n, dim] by a fixed Gaussian projection N(0, 1/dim) drawn from ``seed``
    (approximately norm-preserving); unchanged when the width already is ``dim``."""
    width = weights.shape[1]
    if width == dim:
        return weights
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(width, dim, generator=gen) / dim**0.5
    return weights @ proj


def gene_embedding_for(model_cfg: Any, params: dict, vocab: list[tuple[str, str]] | str | Path, seed: int,
                       verbose: bool = True) -> torch.Tensor:
    """The [n_genes, width] matrix a Performer built from ``params`` should load (``ModelConfig``
    fields ``gene_embedding``, ``gene_embedding_genes``, ``gene_embedding_projection``).

    With projection "learned" and a width other than ``params["dim"]``, sets
    ``params["gene_embedding_dim"]`` so the model gets its Linear(width -> dim).
    """
    if model_cfg.family != "performer":
        raise ValueError("model.gene_embedding: only the performer family has a gene identity embedding")
    if model_cfg.gene_embedding_projection not in ("random", "learned"):
        raise ValueError(f"model.gene_embedding_projection: {model_cfg.gene_embedding_projection!r} is not "
                         "'random' or 'learned'")
    emb = load_gene_embedding(model_cfg.gene_embedding, vocab, genes_file=model_cfg.gene_embedding_genes, seed=seed)
    if verbose:
        print(f"[train] gene embedding {emb.report()}", flush=True)
    dim, width = params.get("dim", 200), emb.weights.shape[1]
    if width != dim and model_cfg.gene_embedding_projection == "learned":
        params["gene_embedding_dim"] = width
        return emb.weights
    return fit_width(emb.weights, dim, seed=seed)
