"""Map an AnnData's genes onto an export's vocabulary.

Genes are matched by stable id (Ensembl, version suffix ignored) or by symbol, from
``var_names`` or a gene-id / symbol column of ``var``; the source that matches more
vocabulary genes wins. Vocabulary genes the data lacks are zero-filled, which the
model reads as "not expressed": that is why too little overlap is refused instead
of silently producing embeddings of mostly-zero cells.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from scpretrain.evaluate.errors import EvaluateError
from scpretrain.scmodels.genes import normalize_gene_id

# var columns that often hold gene ids or symbols (scanpy's 10x reader, CELLxGENE, Seurat conversions).
GENE_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "feature_id", "gene_symbols", "feature_name", "symbol")
# one normalization for corpus builds and evaluate: Ensembl versions dropped, symbols kept as they are
strip_version = normalize_gene_id


@dataclass
class Coverage:
    """How many of the export's genes the data provides, and from where."""

    n_vocab: int
    n_matched: int
    n_query_genes: int
    source: str  # "var_names" or "var['<column>']"
    matched_by: str  # "gene_id" or "symbol"
    n_duplicates: int = 0  # query genes that repeat an already matched name (summed when allowed)
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
            text += f"; {self.n_duplicates} duplicated gene name(s) summed"
        return text


def _candidates(var_names: Any, var: Any) -> list[tuple[str, list[str]]]:
    cands = [("var_names", [str(v) for v in var_names])]
    for col in GENE_COLUMNS:
        if var is not None and col in getattr(var, "columns", ()):
            cands.append((f"var[{col!r}]", ["" if v is None else str(v) for v in var[col]]))
    return cands


def _match(names: list[str], vocab_keys: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(query columns, vocab positions) of the first occurrence of each name, and the same for the later
    occurrences of an already matched name (duplicates)."""
    first_vocab: dict[str, int] = {}
    for i, k in enumerate(vocab_keys):
        first_vocab.setdefault(k, i)
    qcols, vpos, dcols, dpos, seen = [], [], [], [], set()
    for j, name in enumerate(names):
        pos = first_vocab.get(name)
        if pos is None or not name:
            continue
        if pos in seen:
            dcols.append(j)
            dpos.append(pos)
            continue
        seen.add(pos)
        qcols.append(j)
        vpos.append(pos)
    as_int = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return as_int(qcols), as_int(vpos), as_int(dcols), as_int(dpos)


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


def _problem(data: np.ndarray) -> str | None:
    """Why these values are not raw counts (None when they are): NaN/inf, negatives, fractions."""
    bad = int((~np.isfinite(data)).sum())
    if bad:
        return f"{bad:,} NaN/inf values"
    neg = int((data < 0).sum())
    if neg:
        return f"{neg:,} negative values (scaled data?)"
    frac = int((data != np.round(data)).sum())
    if frac:
        example = data[data != np.round(data)][0]
        return f"{frac:,} non-integer values (e.g. {example:.4g}: log-normalized data?)"
    return None


@dataclass
class _Match:
    source: str
    matched_by: str
    qcols: np.ndarray
    vpos: np.ndarray
    dup_cols: np.ndarray
    dup_pos: np.ndarray
    dup_names: list[str]


def _key_match(var_names: Any, var: Any, vocab: list[tuple[str, str]]) -> _Match:
    """The key of this matrix's genes (var_names or a var column, by id or symbol) that matches most."""
    vocab_ids = [strip_version(g) for g, _ in vocab]
    vocab_symbols = [s for _, s in vocab]
    best: _Match | None = None
    for source, names in _candidates(var_names, var):
        # ids first, so that on a tie the unambiguous key wins
        for matched_by, keys, qnames in (("gene_id", vocab_ids, [strip_version(n) for n in names]),
                                         ("symbol", vocab_symbols, [n.strip() for n in names])):
            qcols, vpos, dcols, dpos = _match(qnames, keys)
            if best is None or len(qcols) > len(best.qcols):
                best = _Match(source, matched_by, qcols, vpos, dcols, dpos, [names[j] for j in dcols])
    return best


def _aligned(x: Any, qcols: np.ndarray, vpos: np.ndarray, n_vocab: int) -> sp.csr_matrix:
    sub = sp.csr_matrix(x)[:, qcols] if sp.issparse(x) else sp.csr_matrix(np.asarray(x)[:, qcols])
    # sub's column j is vocabulary position vpos[j]: renumber the columns instead of densifying; repeated
    # positions (summed duplicate genes) add up
    out = sp.csr_matrix((sub.data.astype(np.float32), vpos[sub.indices], sub.indptr.copy()),
                        shape=(sub.shape[0], n_vocab))
    out.sum_duplicates()
    out.sort_indices()
    return out


def _sources(adata: Any, layer: str | None, name: str) -> list[tuple[Any, Any, Any, str]]:
    """Matrices to try, in order: the named one; without a name X, then layers['counts'], then raw.X."""
    if layer is not None:
        return [count_source(adata, layer, name)]
    out = [count_source(adata, None, name)]
    if "counts" in getattr(adata, "layers", {}):
        out.append(count_source(adata, "counts", name))
    raw = getattr(adata, "raw", None)
    if raw is not None and raw.X is not None and raw.X.shape[0] == adata.n_obs:
        out.append(count_source(adata, "raw", name))
    return out


def align_to_vocab(
    adata: Any,
    vocab: list[tuple[str, str]],
    min_coverage: float = 0.5,
    layer: str | None = None,
    name: str = "adata",
    verbose: bool = True,
    *,
    allow_normalized: bool = False,
    sum_duplicates: bool = False,
) -> tuple[sp.csr_matrix, Coverage]:
    """Raw counts of ``adata`` in vocabulary order: float32 CSR [n_obs, len(vocab)], plus the coverage.

    ``layer``: a key of ``adata.layers``, or ``"raw"`` for ``adata.raw``; None takes the first
    of X, ``layers["counts"]``, ``raw.X`` that holds raw counts (non-negative integers) over the
    export's genes, and says which. Refused, with the fix named: no cells; NaN/inf values; no
    matrix of counts (unless ``allow_normalized``: then X, or the named layer, as it is);
    duplicated gene names among the matched genes (unless ``sum_duplicates``: their counts are
    added); fewer than ``min_coverage`` of the vocabulary genes found.
    """
    if getattr(adata, "n_obs", None) == 0:
        raise EvaluateError(f"{name}: no cells (n_obs is 0); pass an h5ad with cells")
    tried: list[str] = []
    chosen, fallback = None, None
    for x, var_names, var, where in _sources(adata, layer, name):
        m = _key_match(var_names, var, vocab)
        if len(m.qcols) == 0:
            tried.append(f"{where}: none of the export's genes")
            continue
        out = _aligned(x, m.qcols, m.vpos, len(vocab))
        problem = _problem(out.data)
        if problem is None:
            chosen = (out, var_names, where, m, x)
            break
        if problem.endswith("NaN/inf values"):
            raise EvaluateError(f"{name}: {where} has {problem} over the export's genes; replace them (e.g. "
                                "numpy.nan_to_num) or pass the layer with raw counts (--layer)")
        tried.append(f"{where}: {problem}")
        if fallback is None:
            fallback = (out, var_names, where, m, x)
    if chosen is None and allow_normalized and fallback is not None:
        chosen = fallback
        warnings.warn(f"{name}: no raw counts ({tried[0]}); {fallback[2]} used as it is (allow_normalized): "
                      "the model normalizes counts itself, so its inputs differ from what it was trained on",
                      stacklevel=2)
    if chosen is None:
        looked = "; ".join(tried) or "nothing to read"
        if all("none of the export's genes" in t for t in tried):
            tried_min = 0.0
            raise EvaluateError(f"{name}: only 0/{len(vocab)} ({tried_min:.1%}) of the export's genes found "
                                f"({looked}); min_coverage is {min_coverage:.0%}. Put Ensembl ids or symbols "
                                "of the model's species in var_names or var['gene_ids'] / var['gene_symbols']")
        raise EvaluateError(f"{name}: no raw counts found ({looked}); evaluate expects raw integer counts in X, "
                            "layers['counts'] or raw.X (name one with --layer / layer=), or pass "
                            "--allow-normalized (allow_normalized=True) to use the values as they are")
    out, var_names, where, m, x = chosen
    if len(m.dup_cols) and not sum_duplicates:
        shown = ", ".join(sorted(set(m.dup_names))[:5])
        raise EvaluateError(f"{name}: {len(m.dup_cols)} duplicated gene name(s) in {m.source} among the export's "
                            f"genes (e.g. {shown}); make them unique, or pass --sum-duplicates "
                            "(sum_duplicates=True) to add up their counts")
    if len(m.dup_cols):  # every occurrence onto its gene's vocabulary position: the counts add up
        out = _aligned(x, np.concatenate([m.qcols, m.dup_cols]), np.concatenate([m.vpos, m.dup_pos]),
                       len(vocab))
    found = np.zeros(len(vocab), dtype=bool)
    found[m.vpos] = True
    cov = Coverage(n_vocab=len(vocab), n_matched=int(found.sum()), n_query_genes=len(var_names),
                   source=m.source, matched_by=m.matched_by, n_duplicates=len(m.dup_cols),
                   missing_examples=[s or g for (g, s), f in zip(vocab, found) if not f][:10])
    if verbose:
        note = f" (not X: {tried[0]})" if layer is None and where != "X" and tried else ""
        print(f"{name}: counts from {where}{note}; {cov}")
    if cov.fraction < min_coverage:
        raise EvaluateError(
            f"{name}: only {cov.n_matched}/{cov.n_vocab} ({cov.fraction:.1%}) of the export's genes found "
            f"(best: {m.source} by {m.matched_by}); min_coverage is {min_coverage:.0%}. Put Ensembl ids or "
            "symbols of the model's species in var_names or var['gene_ids'] / var['gene_symbols'], "
            "or lower min_coverage")
    return out, cov


def nonempty_cells(counts: sp.csr_matrix, name: str, verbose: bool = True) -> np.ndarray:
    """Row indices of cells with counts over the export's genes; the others are reported (and left out)."""
    totals = np.asarray(counts.sum(axis=1)).ravel()
    keep = np.flatnonzero(totals > 0)
    if len(keep) == 0:
        raise EvaluateError(f"{name}: none of its {counts.shape[0]:,} cells has counts over the export's genes; "
                            "check that var names are genes of the model's species and X holds counts")
    if verbose and len(keep) < counts.shape[0]:
        print(f"{name}: dropped {counts.shape[0] - len(keep):,} of {counts.shape[0]:,} cells with zero counts "
              "over the export's genes (nothing to embed)")
    return keep
