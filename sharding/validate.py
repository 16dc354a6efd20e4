"""Bad-input checks. Each failure is one InputError naming the file, the field and the fix.

Value checks run block by block and are *counted* over a whole matrix before
failing, so the message gives the true number of bad values, not "at least one".
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scpretrain.sharding.errors import InputError

_EXAMPLES = 5


def check_unique(names: Sequence[str] | pd.Index, *, file: str, field: str, fix: str) -> None:
    """Refuse duplicated ids (anndata only warns), listing a few of them."""
    index = pd.Index(names)
    dup_mask = index.duplicated()
    n_dup = int(dup_mask.sum())
    if n_dup:
        examples = ", ".join(map(str, pd.unique(index[dup_mask])[:_EXAMPLES]))
        raise InputError(f"{file}: {field} has {n_dup} duplicate ids (e.g. {examples}); {fix}")


@dataclass
class ValueFaults:
    """Counts of values that are not raw counts, summed over the blocks of one matrix."""

    nan: int = 0
    inf: int = 0
    negative: int = 0
    non_integer: int = 0

    def add(self, values: np.ndarray) -> None:
        """Count the faults among stored values (a sparse matrix's ``.data``, or a dense array)."""
        values = np.asarray(values).ravel()
        if values.size == 0:
            return
        if values.dtype.kind in "iu":  # integers cannot be NaN, inf or fractional
            if values.dtype.kind == "i":
                self.negative += int(np.count_nonzero(values < 0))
            return
        # explicit isfinite: `x % 1 > 0` is False for NaN and inf, which is how validators miss them
        finite = np.isfinite(values)
        if not finite.all():
            nan = np.isnan(values)
            self.nan += int(np.count_nonzero(nan))
            self.inf += int(np.count_nonzero(~finite & ~nan))
            values = values[finite]
        self.negative += int(np.count_nonzero(values < 0))
        self.non_integer += int(np.count_nonzero(values != np.round(values)))

    def merge(self, other: ValueFaults) -> None:
        self.nan += other.nan
        self.inf += other.inf
        self.negative += other.negative
        self.non_integer += other.non_integer

    def is_clean(self, allow_non_integer: bool = False) -> bool:
        return not (self.nan or self.inf or self.negative or (self.non_integer and not allow_non_integer))

    def summary(self) -> str:
        parts = [f"{n} {what}" for n, what in ((self.nan, "NaN"), (self.inf, "infinite"),
                                               (self.negative, "negative"),
                                               (self.non_integer, "non-integer")) if n]
        return ", ".join(parts) + " values" if parts else "no bad values"

    def raise_if_bad(self, *, file: str, matrix: str, allow_non_integer: bool) -> None:
        """Raise the InputError for the most severe fault seen (non-finite, negative, non-integer)."""
        if self.nan or self.inf:
            raise InputError(f"{file}: {matrix} has {self.nan} NaN and {self.inf} infinite values; "
                             "counts must be finite (fix or remove those entries in the source)")
        if self.negative:
            raise InputError(f"{file}: {matrix} has {self.negative} negative values; counts must be >= 0 "
                             "(pass --matrix raw or --matrix layer:NAME if the raw counts are stored "
                             "elsewhere)")
        if self.non_integer and not allow_non_integer:
            raise InputError(f"{file}: {matrix} has {self.non_integer} non-integer values; counts must be "
                             "whole numbers (pass --allow-non-integer if the input is normalized on purpose, "
                             "or --matrix to pick the raw counts)")


def small_counts(values: np.ndarray) -> np.ndarray | None:
    """``values`` as uint16 when every one is an integer in [0, 65535] (raw counts nearly always are), else None.

    One cast and one comparison, where counting faults takes five passes: NaN, inf, negative, fractional and
    too-large values all fail the comparison, and the caller then counts faults with ``ValueFaults``.
    """
    values = np.asarray(values)
    if values.dtype == np.uint16:
        return values
    if values.dtype.kind not in "iuf":
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        small = values.astype(np.uint16)
    return small if np.array_equal(small, values) else None


def genes_per_cell(csr: sp.csr_matrix) -> np.ndarray:
    """Number of expressed genes (stored non-zeros) per row; explicit zeros must be eliminated first."""
    return np.diff(csr.indptr)


@dataclass(frozen=True)
class Holdout:
    """Cells whose ``column`` is one of ``values``, or, with ``fraction``, whose value hashes (with the
    seed) below it: about that share of the distinct values (donors, datasets), each wholly on one side,
    decided value by value so it needs no list of all values and is the same in every rebuild."""

    column: str
    values: tuple[str, ...] = ()
    fraction: float | None = None
    seed: int = 0

    def select(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask of held-out cells for an array of (string) column values."""
        if self.fraction is None:
            return np.isin(keys, list(self.values))
        codes, uniques = pd.factorize(np.asarray(keys, dtype=object))
        held = np.array([self._hash(str(u)) < self.fraction for u in uniques], dtype=bool)
        return held[codes] if len(codes) else np.zeros(0, dtype=bool)

    def _hash(self, value: str) -> float:
        digest = hashlib.blake2b(f"{self.seed}\0{value}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2.0**64


def parse_holdout(text: str | None, seed: int = 0) -> Holdout | None:
    """``COL=VAL[,VAL]`` (those values) or ``COL:FRACTION`` (that share of the values, e.g. donor_id:0.1)."""
    if not text:
        return None
    if "=" not in text and ":" in text:
        col, _, frac = text.partition(":")
        try:
            fraction = float(frac)
        except ValueError:
            fraction = -1.0
        if not col or not 0.0 < fraction < 1.0:
            raise InputError(f"--holdout {text!r}: expected COL:FRACTION with 0 < FRACTION < 1 "
                             "(e.g. --holdout donor_id:0.1)")
        return Holdout(col, fraction=fraction, seed=seed)
    col, sep, vals = text.partition("=")
    values = [v for v in vals.split(",") if v]
    if not sep or not col or not values:
        raise InputError(f"--holdout {text!r}: expected COL=VAL[,VAL] or COL:FRACTION "
                         "(e.g. --holdout dataset_id=synthetic_3 or --holdout donor_id:0.1)")
    return Holdout(col, values=tuple(values), seed=seed)


def parse_matrix(text: str | None) -> str | None:
    """``X`` | ``raw`` | ``layer:NAME`` -> canonical form, or None for auto-detection."""
    if text is None:
        return None
    if text in ("X", "raw") or (text.startswith("layer:") and len(text) > len("layer:")):
        return text
    raise InputError(f"--matrix {text!r}: expected X, raw or layer:NAME")
