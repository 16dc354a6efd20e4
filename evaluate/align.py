"""Map an AnnData's genes onto an export's vocabulary.

Genes are matched by stable id (Ensembl, version suffix ignored) or by symbol, from
``var_names`` or a gene-id / symbol column of ``var``; the source that matches more
vocabulary genes wins. Vocabulary genes the data lacks are zero-filled, which the
model reads as "not expressed": that is why too little overlap is refused instead
of silently producing embeddings of mostly-zero cells.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from evaluate.errors import EvaluateError

# var columns that often hold gene ids or symbols (scanpy's 10x reader, CELLxGENE, Seurat conversions).
GENE_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "feature_id", "gene_symbols", "feature_name", "symbol")
# Only Ensembl-looking ids lose their ".N" suffix: symbols such as "AC000061.1" keep their dot.
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*\d{6,})\.\d+$")


def strip_version(gene_id: str) -> str:
    """'ENSG00000141510.17' -> 'ENSG00000141510'; anything else is returned unchanged."""
    m = _ENSEMBL_VERSION.match(gene_id.strip())
    return m.group(1) if m else gene_id.strip()


@dataclass
class Coverage:
    """How many of the export's genes the data provides, and from where."""

    n_vocab: int
    n_matched: int
    n_query_genes: int
    source: str  # "var_names" or "var['<column>']"
    matched_by: str  # "gene_id" or "symbol"
    n_duplicates: int = 0  # query genes that repeat an already matched name (first occurrence used)
    missing_examples: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.n_matched / self.n_vocab if self.n_vocab else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction": self.fraction}

    def __str__(self) -> str:
        text = (f"gene coverage: {self.n_matched:,}/{self.n_vocab:,} export genes ({self.fraction:.1%}) "
                f"found in {self.source} by {self.matched_by}; {self.n_vocab - self.n_matched:,} zero-filled")
        if self.missing_examples:
            text += f" (e.g. {', '.join(self.missing_examples[:5])})"
        text += f"; {self.n_query_genes - self.n_matched:,} of the data's {self.n_query_genes:,} genes unused"
        if self.n_duplicates:
            text += f"; {self.n_duplicates} duplicate gene name(s), first occurrence used"
        return text


def _candidates(var_names: Any, var: Any) -> list[tuple[str, list[str]]]:
    cands = [("var_names", [str(v) for v in var_names])]
    for col in GENE_COLUMNS:
        if var is not None and col in getattr(var, "columns", ()):
            cands.append((f"var[{col!r}]", ["" if v is None else str(v) for v in var[col]]))
    return cands


def _match(names: list[str], vocab_keys: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """(query columns, vocab positions, duplicates): the first occurrence of each name on both sides."""
    first_vocab: dict[str, int] = {}
    for i, k in enumerate(vocab_keys):
        first_vocab.setdefault(k, i)
    qcols, vpos, seen, dups = [], [], set(), 0
    for j, name in enumerate(names):
        pos = first_vocab.get(name)
        if pos is None or not name:
            continue
        if pos in seen:
            dups += 1
            continue
        seen.add(pos)
        qcols.append(j)
        vpos.append(pos)
    return np.asarray(qcols, dtype=np.int64), np.asarray(vpos, dtype=np.int64), dups


def count_source(adata: Any, layer: str | None, name: str = "adata") -> tuple[Any, Any, Any, str]:
    """(matrix, var_names, var, description) of the counts to use; ``layer='raw'`` means ``adata.raw``."""
    if layer is None:
        x, var_names, var = adata.X, adata.var_names, adata.var
        where = "X"
    elif layer in getattr(adata, "layers", {}):
        x, var_names, var = adata.layers[layer], adata.var_names, adata.var
        where = f"layers[{layer!r}]"
    elif layer == "raw" and getattr(adata, "raw", None) is not None:
        x, var_names, var = adata.raw.X, adata.raw.var_names, adata.raw.var
        where = "raw.X"
    else:
        have = sorted(getattr(adata, "layers", {}).keys())
        if getattr(adata, "raw", None) is not None:
            have.append("raw")
        raise EvaluateError(f"{name}: no layer {layer!r}; available: {have or 'none'} (omit layer to use X)")
    if x is None:
        raise EvaluateError(f"{name}: {where} is empty; pass the layer that holds raw counts (layer=...)")
    return x, var_names, var, where


def _check_counts(data: np.ndarray, name: str, where: str) -> None:
    neg = int((data < 0).sum())
    if neg:
        raise EvaluateError(f"{name}: {where} has {neg:,} negative values; evaluate expects raw counts >= 0 "
                            "(pass the layer with counts, e.g. layer='counts' or layer='raw')")
    if data.size and not np.allclose(data, np.round(data)):
        warnings.warn(f"{name}: {where} holds non-integer values; evaluate normalizes raw counts itself, so "
                      "log-normalized or scaled input gives wrong embeddings (pass the raw counts layer)",
                      stacklevel=3)


def align_to_vocab(
    adata: Any,
    vocab: list[tuple[str, str]],
    min_coverage: float = 0.5,
    layer: str | None = None,
    name: str = "adata",
    verbose: bool = True,
) -> tuple[sp.csr_matrix, Coverage]:
    """Raw counts of ``adata`` in vocabulary order: float32 CSR [n_obs, len(vocab)], plus the coverage.

    ``layer``: None for ``X``, a key of ``adata.layers``, or ``"raw"`` for ``adata.raw``.
    Raises EvaluateError when fewer than ``min_coverage`` of the vocabulary genes are found.
    """
    x, var_names, var, where = count_source(adata, layer, name)
    vocab_ids = [strip_version(g) for g, _ in vocab]
    vocab_symbols = [s for _, s in vocab]
    best: tuple | None = None
    for source, names in _candidates(var_names, var):
        # ids first, so that on a tie the unambiguous key wins
        for matched_by, keys, qnames in (("gene_id", vocab_ids, [strip_version(n) for n in names]),
                                         ("symbol", vocab_symbols, [n.strip() for n in names])):
            qcols, vpos, dups = _match(qnames, keys)
            if best is None or len(qcols) > len(best[2]):
                best = (source, matched_by, qcols, vpos, dups)
    source, matched_by, qcols, vpos, dups = best
    found = np.zeros(len(vocab), dtype=bool)
    found[vpos] = True
    cov = Coverage(n_vocab=len(vocab), n_matched=len(qcols), n_query_genes=len(var_names), source=source,
                   matched_by=matched_by, n_duplicates=dups,
                   missing_examples=[s or g for (g, s), f in zip(vocab, found) if not f][:10])
    if verbose:
        print(f"{name}: {cov}")
    if cov.fraction < min_coverage:
        raise EvaluateError(
            f"{name}: only {cov.n_matched}/{cov.n_vocab} ({cov.fraction:.1%}) of the export's genes found "
            f"(best: {source} by {matched_by}); min_coverage is {min_coverage:.0%}. Put Ensembl ids or "
            "symbols of the model's species in var_names or var['gene_ids'] / var['gene_symbols'], "
            "or lower min_coverage")
    if sp.issparse(x):
        sub = sp.csr_matrix(x)[:, qcols]
    else:
        sub = sp.csr_matrix(np.asarray(x)[:, qcols])
    sub.sum_duplicates()
    _check_counts(sub.data, name, where)
    # sub's column j is vocabulary position vpos[j]: renumber the columns instead of densifying
    out = sp.csr_matrix((sub.data.astype(np.float32), vpos[sub.indices], sub.indptr.copy()),
                        shape=(sub.shape[0], len(vocab)))
    out.sort_indices()
    return out, cov
