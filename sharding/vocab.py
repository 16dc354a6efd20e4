"""Gene vocabulary: load or derive it, and align each source's genes to it.

A source may name genes by Ensembl id (often versioned, ``ENSG00000141510.17``)
or by symbol, in ``var_names`` or in a var column. We try every candidate key
against the vocabulary's ``gene_id`` and ``symbol`` columns and keep the pairing
with the largest overlap, so the user rarely has to say which is which; the
pairing used and the coverage are always reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from scpretrain.scmodels.genes import ENSEMBL_GENE_ID
from scpretrain.scmodels.genes import normalize_gene_id as strip_version
from scpretrain.sharding.errors import InputError

# var columns that commonly hold stable ids or symbols (AnnData, CELLxGENE, 10x conventions)
ID_COLUMNS = ("gene_ids", "gene_id", "feature_id", "ensembl_id", "ensembl_gene_id")
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "symbol", "gene_name", "gene_names")
_ENSEMBL = ENSEMBL_GENE_ID
_ENSEMBL_SHARE = 0.9  # a key "is Ensembl" when nearly all its values look like Ensembl gene ids


def looks_ensembl(values: Sequence[str]) -> bool:
    if not len(values):
        return False
    hits = sum(1 for v in values if _ENSEMBL.match(v))
    return hits >= _ENSEMBL_SHARE * len(values)


@dataclass
class Vocab:
    """The ordered gene vocabulary: column j of every shard is gene_ids[j]."""

    gene_ids: list[str]
    symbols: list[str]
    _by_id: dict[str, int] = field(default_factory=dict, repr=False)
    _by_symbol: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_id, self._by_symbol = {}, {}
        for j, (gid, sym) in enumerate(zip(self.gene_ids, self.symbols)):
            self._index(j, gid, sym)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> Vocab:
        pairs = list(pairs)
        return cls([g for g, _ in pairs], [s for _, s in pairs])

    def __len__(self) -> int:
        return len(self.gene_ids)

    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.gene_ids, self.symbols))

    def append(self, gene_id: str, symbol: str) -> bool:
        """Add a gene unless its (version-stripped) id is already present; True when added."""
        if strip_version(gene_id) in self._by_id:
            return False
        self.gene_ids.append(gene_id)
        self.symbols.append(symbol)
        self._index(len(self.gene_ids) - 1, gene_id, symbol)
        return True

    def lookup(self, target: str) -> dict[str, int]:
        return self._by_id if target == "gene_id" else self._by_symbol

    def _index(self, j: int, gid: str, sym: str) -> None:
        # first occurrence wins: symbols are not unique in real annotations
        self._by_id.setdefault(strip_version(gid), j)
        if sym:
            self._by_symbol.setdefault(sym, j)


@dataclass
class SourceGenes:
    """A source's gene names: var_names plus the var columns that may hold ids or symbols."""

    names: list[str]
    columns: dict[str, list[str]] = field(default_factory=dict)
    _keyed: list[tuple[str, bool, list[str]]] | None = field(default=None, repr=False, compare=False)

    def candidates(self) -> list[tuple[str, list[str]]]:
        keys = [("var_names", self.names)]
        for col in ID_COLUMNS + SYMBOL_COLUMNS:
            if col in self.columns:
                keys.append((f"var['{col}']", self.columns[col]))
        return keys

    def keyed(self) -> list[tuple[str, bool, list[str]]]:
        """(key name, is Ensembl, match keys) per candidate: Ensembl ids version-stripped. Computed once
        (one regex pass per value), as derivation and alignment ask for it several times per source."""
        if self._keyed is None:
            self._keyed = []
            for name, values in self.candidates():
                ensembl = looks_ensembl(values)
                keys = [strip_version(v) for v in values] if ensembl else list(values)
                self._keyed.append((name, ensembl, keys))
        return self._keyed

    def preferred(self) -> tuple[list[str], list[str]]:
        """(ids, symbols) for a derived vocabulary: Ensembl ids when any key has them, else var_names."""
        ids, symbols = None, None
        for (_, values), (_, ensembl, keys) in zip(self.candidates(), self.keyed()):
            if ensembl:
                ids = ids or keys
            else:
                symbols = symbols or list(values)
        ids = ids or list(self.names)
        return ids, symbols or ids


@dataclass
class Alignment:
    """How one source's columns map onto the vocabulary (-1: the gene is dropped)."""

    col_map: np.ndarray
    n_vocab: int
    matched_by: str
    _cache: tuple[bool, bool] | None = field(default=None, repr=False, compare=False)

    @property
    def n_source(self) -> int:
        return int(self.col_map.size)

    @property
    def n_matched(self) -> int:
        return int(np.count_nonzero(self.col_map >= 0))

    @property
    def gene_coverage(self) -> float:
        """Matched source genes / source genes."""
        return self.n_matched / self.n_source if self.n_source else 0.0

    @property
    def vocab_coverage(self) -> float:
        """Vocabulary genes this source covers / vocabulary genes (the rest are zero for its cells)."""
        return self.n_matched / self.n_vocab if self.n_vocab else 0.0

    def apply(self, csr: sp.csr_matrix) -> sp.csr_matrix:
        """Re-index a (cells x source genes) CSR block to (cells x vocab), dropping unmatched genes."""
        if self._identity:
            out = sp.csr_matrix((csr.data, csr.indices.astype(np.int32, copy=False),
                                 csr.indptr.astype(np.int64, copy=False)), shape=(csr.shape[0], self.n_vocab))
            if not out.has_sorted_indices:  # sorted on a copy: ``csr``'s arrays are shared and not ours to change
                out = out.copy()
                out.sort_indices()
            return out
        new = self.col_map[csr.indices]
        keep = new >= 0
        if keep.all():
            data, indices, indptr = csr.data, new, csr.indptr
        else:
            kept_before = np.concatenate([[0], np.cumsum(keep)])
            data, indices, indptr = csr.data[keep], new[keep], kept_before[csr.indptr]
        out = sp.csr_matrix((data, indices.astype(np.int32), indptr.astype(np.int64)),
                            shape=(csr.shape[0], self.n_vocab))
        # vocab order may differ from source order; CSR readers expect sorted columns
        if not (self._monotonic and csr.has_sorted_indices):
            out = out.copy()  # the values may be ``csr``'s own array
            out.sort_indices()
        return out

    @property
    def _identity(self) -> bool:
        """Source column j is vocab column j for every j: nothing to re-index."""
        if self._cache is None:
            self._set_cache()
        return self._cache[0]

    @property
    def _monotonic(self) -> bool:
        """Kept source columns keep their relative order: sorted rows stay sorted."""
        if self._cache is None:
            self._set_cache()
        return self._cache[1]

    def _set_cache(self) -> None:
        kept = self.col_map[self.col_map >= 0]
        identity = self.n_source == self.n_vocab and bool(
            np.array_equal(self.col_map, np.arange(self.n_source)))
        self._cache = (identity, bool(np.all(np.diff(kept) > 0)))

    def describe(self) -> str:
        return (f"{self.n_matched}/{self.n_source} source genes matched ({self.gene_coverage:.1%}) by "
                f"{self.matched_by}; covers {self.vocab_coverage:.1%} of the {self.n_vocab}-gene vocabulary")


def align(genes: SourceGenes, vocab: Vocab) -> Alignment:
    """Map source genes to vocabulary columns by the (source key, vocab column) pair with most overlap."""
    best: Alignment | None = None
    for key_name, ensembl, keys in genes.keyed():
        for target in ("gene_id", "symbol"):
            col_map = _map_unique(keys, vocab.lookup(target))
            how = f"{key_name}{' (Ensembl, versions stripped)' if ensembl else ''} -> vocab {target}"
            cand = Alignment(col_map, len(vocab), how)
            if best is None or cand.n_matched > best.n_matched:
                best = cand
    assert best is not None
    return best


def check_coverage(alignment: Alignment, *, file: str, min_coverage: float) -> None:
    """Refuse a source when too few of its genes are in the vocabulary (wrong species or id type)."""
    if alignment.gene_coverage < min_coverage:
        raise InputError(
            f"{file}: var: only {alignment.n_matched} of {alignment.n_source} genes "
            f"({alignment.gene_coverage:.1%}) match the vocabulary (best: {alignment.matched_by}); "
            f"at least {min_coverage:.0%} required (use a --vocab with the same species and id type, "
            "or lower --min-coverage)")


def derive_vocab(sources: Sequence[SourceGenes]) -> Vocab:
    """The union of the sources' genes, in first-seen order, matching later sources by id or symbol."""
    vocab = Vocab([], [])
    for genes in sources:
        ids, symbols = genes.preferred()
        col_map = align(genes, vocab).col_map if len(vocab) else np.full(len(ids), -1)
        for j in np.flatnonzero(col_map < 0):
            vocab.append(ids[j], symbols[j])
    return vocab


def _map_unique(keys: Sequence[str], lookup: dict[str, int]) -> np.ndarray:
    # Two source genes may land on one vocab gene (duplicate symbols, ids differing only by
    # version): keep the first, or the second would silently overwrite its counts.
    col_map = np.fromiter((lookup.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
    hit = np.flatnonzero(col_map >= 0)
    _, first = np.unique(col_map[hit], return_index=True)
    dropped = np.setdiff1d(hit, hit[first], assume_unique=True)
    col_map[dropped] = -1
    return col_map
