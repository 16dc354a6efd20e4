"""GenePT-w and GenePT-s: training-free cell embeddings (Chen & Zou, GenePT).

For cell ``i`` with expression weights ``w_ig`` over the genes ``g`` that have an
embedding ``v_g`` (rows of an external file, e.g. text embeddings of gene summaries)::

    e_i = sum_g w_ig v_g / sum_g w_ig            (the expression-weighted average)
    X_genept[i] = e_i / ||e_i||_2                (L2-normalized; a cell with no weight stays 0)

``weights``: ``"log1p"`` (default) = log1p(counts / total * 1e4) with ``total`` the cell's
counts over *all* its genes (scanpy's normalize_total + log1p), ``"normalized"`` = counts /
total * 1e4, ``"counts"`` = the raw counts. The file's genes are matched to the data's by
stable id (Ensembl versions ignored) or symbol, from ``var_names`` or a gene-id / symbol
column of ``var`` (whichever matches more, as ``evaluate.align`` does for exports); query
genes without an embedding are left out of the average.

GenePT-s (:func:`genept_s`) writes each cell as a sentence, the symbols of its expressed genes ranked
by normalized expression (highest first; ties in alphabetical order), and embeds the sentence whole with
a local text model (``evaluate.text.SentenceModel``; default the MiniLM of the ``text`` extra),
L2-normalized, into ``obsm["X_genept_s"]``. GenePT writes every expressed gene and lets the text model
cut the sentence at its context (8,191 tokens for their ada-002); a gene symbol is at least one word
piece, so the default ``top_n`` (the model's own limit, 256 word pieces for MiniLM) writes no fewer genes
than the model reads, and how many it really reads per cell is reported (``genes_in_context``).

No model and no export: they are baselines a pretrained encoder should beat, and kNN on them
annotates a query (:func:`genept_annotate`, ``python -m evaluate genept [--mode sentence]``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scpretrain.evaluate.align import align_to_vocab, count_source, strip_version
from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.vectors import read_vectors
from scpretrain.scmodels.genes import ENSEMBL_ID

WEIGHTS = ("log1p", "normalized", "counts")
MODES = ("weighted", "sentence")
_ENSEMBL = ENSEMBL_ID
EMBEDDING_KEY = "X_genept"
SENTENCE_KEY = "X_genept_s"
SYMBOL_COLUMNS = ("gene_symbols", "feature_name", "symbol", "gene_symbol")


@dataclass
class GeneVectors:
    """Per-gene embeddings: ``names`` (ids or symbols) and ``vectors`` float32 [n_genes, width];
    ``symbols``, when given, pairs each name (then a gene id) with its symbol for matching."""

    names: list[str]
    vectors: np.ndarray
    source: str = "<memory>"
    symbols: list[str] | None = None

    def vocab(self) -> list[tuple[str, str]]:
        """(gene id, symbol) per row, as ``evaluate.align`` matches them."""
        if self.symbols is not None:
            return [(strip_version(n), s) for n, s in zip(self.names, self.symbols)]
        # Ensembl-looking names match as ids (versions ignored), everything else as symbols
        return [(strip_version(n), n) if _ENSEMBL.match(n) else ("", n) for n in self.names]

    @classmethod
    def load(cls, path: str | Path, names_file: str | Path | None = None) -> GeneVectors:
        """From a text table, a .npy + gene list or a JSON object (see ``evaluate.vectors``)."""
        names, mat = read_vectors(path, names_file)
        return cls(names, mat, str(path))

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])


def export_gene_vectors(model: Any) -> GeneVectors:
    """A Performer export's gene identity vectors (after its learned projection, if any), named by gene id:
    the pretrained model's own per-gene embeddings as a GenePT-w table."""
    import torch

    if model.family != "performer":
        raise EvaluateError(f"{model.path}: a {model.family} export has no per-gene identity embedding; "
                            "only a performer export does")
    with torch.no_grad():
        table = model.module.gene_identity()[:-1].float().cpu().numpy()  # the appended pad row dropped
    return GeneVectors(model.gene_ids, table, f"{model.path} (gene identity embedding)",
                       symbols=model.symbols)


def as_gene_vectors(genes: GeneVectors | str | Path) -> GeneVectors:
    return genes if isinstance(genes, GeneVectors) else GeneVectors.load(genes)


def expression_weights(counts: sp.csr_matrix, totals: np.ndarray, weights: str = "log1p") -> sp.csr_matrix:
    """The weights ``w_ig`` (float64 CSR, the pattern of ``counts``); ``totals``: each cell's total counts."""
    if weights not in WEIGHTS:
        raise EvaluateError(f"GenePT-w: weights {weights!r} is not one of {WEIGHTS}")
    w = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    if weights == "counts":
        return w
    scale = np.divide(1e4, totals, out=np.zeros(len(totals), np.float64), where=totals > 0)
    w = sp.csr_matrix(sp.diags(scale) @ w)
    if weights == "log1p":
        w.data = np.log1p(w.data)
    return w


def genept_w(
    adata: Any,
    genes: GeneVectors | str | Path,
    weights: str = "log1p",
    layer: str | None = None,
    min_coverage: float = 0.1,
    name: str = "adata",
    verbose: bool = True,
) -> tuple[np.ndarray, dict]:
    """GenePT-w embeddings [n_obs, width] (float32) of ``adata``'s raw counts, and a coverage record.

    ``min_coverage``: refuse when fewer than this fraction of the data's genes have an embedding.
    """
    genes = as_gene_vectors(genes)
    x, var_names, _, _ = count_source(adata, layer, name)
    counts, cov = align_to_vocab(adata, genes.vocab(), min_coverage=0.0, layer=layer, name=name,
                                 verbose=False)
    n_query = len(var_names)
    frac = cov.n_matched / max(n_query, 1)
    info = {"gene_embeddings": genes.source, "n_query_genes": n_query, "n_matched": cov.n_matched,
            "fraction_of_query_genes": frac, "matched_by": cov.matched_by, "source": cov.source,
            "weights": weights, "width": genes.width}
    if verbose:
        print(f"{name}: GenePT-w: {cov.n_matched:,} of the data's {n_query:,} genes ({frac:.1%}) have an "
              f"embedding in {genes.source} (matched by {cov.matched_by} in {cov.source}), "
              f"width {genes.width}")
    if cov.n_matched == 0 or frac < min_coverage:
        raise EvaluateError(
            f"{name}: only {cov.n_matched} of its {n_query} genes ({frac:.1%}) have an embedding in "
            f"{genes.source} (min_coverage {min_coverage:.0%}); use a gene embedding file of the same "
            "species and naming (Ensembl ids or symbols in var_names or var['gene_ids'] / "
            "var['gene_symbols'])")
    totals = np.asarray(sp.csr_matrix(x).sum(axis=1), dtype=np.float64).ravel()
    w = expression_weights(counts, totals, weights)
    denom = np.asarray(w.sum(axis=1)).ravel()
    emb = np.asarray(w @ genes.vectors.astype(np.float64))
    emb = np.divide(emb, denom[:, None], out=np.zeros_like(emb), where=denom[:, None] > 0)
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.divide(emb, norm, out=np.zeros_like(emb), where=norm > 0)
    n_empty = int((norm.ravel() == 0).sum())
    info["n_cells_without_weight"] = n_empty
    if n_empty:
        warnings.warn(f"{name}: {n_empty} cell(s) express none of the genes with an embedding; their "
                      "GenePT-w embedding is all zeros", stacklevel=2)
    return emb.astype(np.float32), info


def genept_embed(adata: Any, genes: GeneVectors | str | Path, weights: str = "log1p",
                 layer: str | None = None, min_coverage: float = 0.1, verbose: bool = True) -> Any:
    """Write ``adata.obsm["X_genept"]`` (see :func:`genept_w`); returns ``adata``."""
    emb, info = genept_w(adata, genes, weights=weights, layer=layer, min_coverage=min_coverage,
                         verbose=verbose)
    adata.obsm[EMBEDDING_KEY] = emb
    adata.uns["evaluate"] = {"method": "genept_w", **info}
    return adata


def gene_symbols(var_names: Any, var: Any, name: str = "adata") -> list[str]:
    """The data's gene symbols: a var symbol column when there is one, else var_names unless they are
    Ensembl ids (a text model reads symbols, not ids)."""
    for col in SYMBOL_COLUMNS:
        if var is not None and col in getattr(var, "columns", ()):
            return ["" if v is None else str(v) for v in var[col]]
    names = [str(v) for v in var_names]
    n_ids = sum(bool(_ENSEMBL.match(n)) for n in names)
    if n_ids > len(names) / 2:
        raise EvaluateError(f"{name}: var_names are Ensembl ids ({n_ids:,} of {len(names):,}) and var has no "
                            f"symbol column ({', '.join(SYMBOL_COLUMNS)}); GenePT-s writes gene symbols: add "
                            "var['gene_symbols']")
    return names


def cell_sentences(adata: Any, top_n: int, layer: str | None = None, name: str = "adata"
                   ) -> tuple[list[str], list[np.ndarray], list[str]]:
    """Each cell's sentence (its expressed genes' symbols, highest normalized expression first, ties
    alphabetical, at most ``top_n``), the gene columns it holds, and the data's symbols."""
    if top_n < 1:
        raise EvaluateError(f"GenePT-s: top_n is {top_n}; pass a positive number of genes")
    x, var_names, var, where = count_source(adata, layer, name)
    symbols = gene_symbols(var_names, var, name)
    x = sp.csr_matrix(x)
    if x.nnz and (not np.isfinite(x.data).all() or (x.data < 0).any()):
        raise EvaluateError(f"{name}: {where} has NaN/inf or negative values; GenePT-s ranks genes by "
                            "expression: pass raw counts (or a layer of them)")
    alpha = np.empty(len(symbols), np.int64)
    alpha[np.argsort(np.asarray(symbols, dtype=object), kind="stable")] = np.arange(len(symbols))
    sym = np.asarray(symbols, dtype=object)
    sentences, picked = [], []
    for i in range(x.shape[0]):
        lo, hi = x.indptr[i], x.indptr[i + 1]
        cols, vals = x.indices[lo:hi], x.data[lo:hi]
        keep = (vals > 0) & (sym[cols] != "")
        cols, vals = cols[keep], vals[keep]
        # per-cell normalization and log1p keep the order, so the counts rank the genes
        order = np.lexsort((alpha[cols], -vals))[:top_n]
        picked.append(cols[order])
        sentences.append(" ".join(sym[cols[order]]))
    return sentences, picked, symbols


def genept_s(
    adata: Any,
    model: Any = None,
    top_n: int | None = None,
    layer: str | None = None,
    batch_size: int = 64,
    name: str = "adata",
    verbose: bool = True,
) -> tuple[np.ndarray, dict]:
    """GenePT-s embeddings [n_obs, width] (float32, L2-normalized) and a record; ``model``: a
    ``SentenceModel``, a package or directory (default the ``text`` extra's MiniLM)."""
    from scpretrain.evaluate.text import as_sentence_model

    model = as_sentence_model(model)
    top_n = top_n or model.max_tokens
    sentences, picked, symbols = cell_sentences(adata, top_n, layer, name)
    tokens = model.token_counts(symbols)
    room = model.max_tokens - 2  # [CLS] and [SEP]
    in_context = np.asarray([int(np.searchsorted(np.cumsum(tokens[p]), room, side="right")) for p in picked])
    n_genes = np.asarray([len(p) for p in picked])
    empty = n_genes == 0
    if verbose:
        print(f"{name}: GenePT-s: {len(sentences):,} cell sentences of up to {top_n} genes; the text model "
              f"({model.name}, {model.max_tokens} word pieces) reads the first {np.median(in_context):.0f} "
              f"genes of a cell (median; mean {in_context.mean():.1f})")
    emb = model.encode(sentences, batch_size=batch_size, progress=verbose)
    emb[empty] = 0.0
    info = {"method": "genept_s", "text_model": model.name, "top_n": int(top_n), "max_tokens": model.max_tokens,
            "genes_written_mean": float(n_genes.mean()) if len(n_genes) else 0.0,
            "genes_in_context_mean": float(in_context.mean()) if len(in_context) else 0.0,
            "genes_in_context_median": float(np.median(in_context)) if len(in_context) else 0.0,
            "n_cells_without_genes": int(empty.sum()), "width": int(emb.shape[1])}
    if empty.any():
        warnings.warn(f"{name}: {int(empty.sum())} cell(s) express no gene with a symbol; their GenePT-s "
                      "embedding is all zeros", stacklevel=2)
    return emb, info


def genept_s_embed(adata: Any, model: Any = None, top_n: int | None = None, layer: str | None = None,
                   batch_size: int = 64, verbose: bool = True) -> Any:
    """Write ``adata.obsm["X_genept_s"]`` (see :func:`genept_s`); returns ``adata``."""
    emb, info = genept_s(adata, model, top_n=top_n, layer=layer, batch_size=batch_size, verbose=verbose)
    adata.obsm[SENTENCE_KEY] = emb
    adata.uns["evaluate"] = info
    return adata


def genept_annotate(
    adata: Any,
    reference: Any,
    genes: GeneVectors | str | Path | None,
    label_key: str = "cell_type",
    *,
    mode: str = "weighted",
    sentence_model: Any = None,
    top_n: int | None = None,
    k: int = 5,
    threshold: float = 0.5,
    max_distance: float | str | None = "auto",
    weights: str = "log1p",
    layer: str | None = None,
    reference_layer: str | None = None,
    min_coverage: float = 0.1,
    verbose: bool = True,
) -> Any:
    """Label ``adata`` by kNN (cosine, ``k`` neighbours) on GenePT embeddings of it and ``reference``:
    ``mode="weighted"`` (GenePT-w, from ``genes``) or ``"sentence"`` (GenePT-s, from ``sentence_model``).

    Writes ``obs["predicted_<label_key>"]`` ("Unassigned" below ``threshold`` of the votes or
    when the neighbours are farther than ``max_distance``, as ``annotate(head="knn")``),
    ``obs["predicted_<label_key>_probability"]`` and ``obsm["X_genept"]`` (or ``"X_genept_s"``);
    returns ``adata``.
    """
    from scpretrain.evaluate.annotate import UNASSIGNED, _write, assign, knn_proba
    from scpretrain.evaluate.finetune import labels_of
    from scpretrain.evaluate.text import as_sentence_model

    if mode not in MODES:
        raise EvaluateError(f"GenePT: mode {mode!r} is not one of {MODES}")
    labels, rows = labels_of(reference, label_key)
    if mode == "weighted":
        if genes is None:
            raise EvaluateError("GenePT-w needs per-gene embeddings (genes=FILE; CLI --gene-embeddings)")
        genes = as_gene_vectors(genes)
        kw = dict(weights=weights, min_coverage=min_coverage, verbose=verbose)
        query_emb, info = genept_w(adata, genes, layer=layer, name="query", **kw)
        ref_emb, _ = genept_w(reference, genes, layer=reference_layer, name="reference", **kw)
        key, method = EMBEDDING_KEY, "genept_w"
    else:
        model = as_sentence_model(sentence_model)
        query_emb, info = genept_s(adata, model, top_n=top_n, layer=layer, name="query", verbose=verbose)
        ref_emb, _ = genept_s(reference, model, top_n=top_n, layer=reference_layer, name="reference",
                              verbose=verbose)
        key, method = SENTENCE_KEY, "genept_s"
    proba, classes = knn_proba(ref_emb[rows], labels, query_emb, k=k, max_distance=max_distance)
    pred, prob = assign(proba, classes, threshold)
    _write(adata, label_key, pred, prob, classes)
    adata.obsm[key] = query_emb
    adata.uns["evaluate"] = {**info, "method": method, "head": "knn", "k": k, "threshold": threshold}
    if verbose:
        n_un = int((pred == UNASSIGNED).sum())
        print(f"annotated {len(pred):,} cells into {len(classes)} classes with kNN (k={k}) on "
              f"{'GenePT-w' if mode == 'weighted' else 'GenePT-s'}; {n_un:,} Unassigned "
              f"(vote fraction < {threshold})")
    return adata
