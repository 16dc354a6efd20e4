"""Pass-1 scratch space: per-shard append-only files under DIR/.build/spool/.

Pass 1 deals every kept cell to a random destination shard. Rows are buffered in
memory per shard and appended to that shard's files when the buffer reaches a
byte budget, so memory is bounded by the budget (not the corpus) and the number
of files is a handful per shard (not per block x shard). Pass 2 reads one
shard's files back, bounded by cells-per-shard.

Counts are spooled as uint16 while every value so far is an integer of at most 65,535 (raw counts nearly
always are; the first value that is not widens the task's spool to float32 once), and gene indices as uint16
when the vocabulary has at most 65,536 genes: half the bytes written and read back of float32/int32.

String obs columns are stored as int32 codes into per-column category lists
(``Categories``) kept in memory and saved with the pass-1 state: cheap for the
low-cardinality metadata a corpus keeps (dataset, cell type, donor, assay).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

_NAMES = ("data", "indices", "rownnz", "cell_id", "obs")
# in the plan's fingerprint: an unfinished build whose spool an older version wrote (float32 / int32 / int64
# files) starts over instead of being read back with the wrong dtypes
SPOOL_FORMAT = 2
_WIDE = "data.float32"  # marker in the spool's root: its counts files hold float32, not uint16


class Categories:
    """A growing string -> int32 code table for one obs column."""

    def __init__(self, values: Sequence[str] = ()):
        self.values: list[str] = list(values)
        self._code = {v: i for i, v in enumerate(self.values)}

    def encode(self, strings: Sequence[str] | np.ndarray | pd.Series) -> np.ndarray:
        # factorize first so the Python-level dictionary work is per distinct value, not per cell
        local, uniques = pd.factorize(np.asarray(strings, dtype=object))
        table = np.array([self._add(str(u)) for u in uniques], dtype=np.int32)
        return table[local] if len(local) else np.zeros(0, dtype=np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return np.asarray(self.values, dtype=object)[codes] if len(codes) else np.zeros(0, dtype=object)

    def _add(self, value: str) -> int:
        code = self._code.get(value)
        if code is None:
            code = self._code[value] = len(self.values)
            self.values.append(value)
        return code


class ShardSpool:
    """Append rows to per-shard files; read a shard back as (CSR, cell_ids, obs codes)."""

    def __init__(self, root: Path, n_shards: int, n_genes: int, n_obs_cols: int, budget_bytes: int):
        self.root, self.n_shards, self.n_genes, self.n_obs_cols = root, n_shards, n_genes, n_obs_cols
        self.budget = budget_bytes
        self._buf: dict[int, list[tuple[np.ndarray, ...]]] = {}
        self._bytes = 0
        wide = (root / _WIDE).exists()
        self.dtypes = {"data": np.dtype(np.float32 if wide else np.uint16),
                       "indices": np.dtype(np.uint16 if n_genes <= 65536 else np.int32),
                       "rownnz": np.dtype(np.int32), "cell_id": np.dtype(np.int64), "obs": np.dtype(np.int32)}

    def shard_dir(self, shard: int) -> Path:
        return self.root / f"shard-{shard:05d}"

    def add(self, dest: np.ndarray, csr: sp.csr_matrix, cell_ids: np.ndarray, obs_codes: np.ndarray) -> None:
        """Buffer rows (one destination shard per row); flush when the buffer passes the budget."""
        if csr.data.dtype != np.uint16 and self.dtypes["data"] == np.uint16:
            self._widen()
        order = np.argsort(dest, kind="stable")
        csr, cell_ids, obs_codes, dest = csr[order], cell_ids[order], obs_codes[order], dest[order]
        bounds = np.searchsorted(dest, np.arange(self.n_shards + 1))
        rownnz = np.diff(csr.indptr).astype(np.int64)
        for shard in np.flatnonzero(np.diff(bounds)):
            lo, hi = bounds[shard], bounds[shard + 1]
            a, b = csr.indptr[lo], csr.indptr[hi]
            piece = (csr.data[a:b], csr.indices[a:b], rownnz[lo:hi], cell_ids[lo:hi], obs_codes[lo:hi])
            self._buf.setdefault(int(shard), []).append(piece)
            self._bytes += sum(x.nbytes for x in piece)
        if self._bytes >= self.budget:
            self.flush()

    def flush(self) -> None:
        for shard, pieces in self._buf.items():
            d = self.shard_dir(shard)
            d.mkdir(parents=True, exist_ok=True)
            for i, name in enumerate(_NAMES):
                with open(d / name, "ab") as f:
                    for piece in pieces:
                        np.ascontiguousarray(piece[i], dtype=self.dtypes[name]).tofile(f)
        self._buf.clear()
        self._bytes = 0

    def _widen(self) -> None:
        """Counts that do not fit uint16 arrived: rewrite what is spooled so far as float32, once."""
        self.flush()
        self.root.mkdir(parents=True, exist_ok=True)
        for d in sorted(self.root.glob("shard-*")):
            np.fromfile(d / "data", dtype=np.uint16).astype(np.float32).tofile(d / "data")
        (self.root / _WIDE).touch()
        self.dtypes["data"] = np.dtype(np.float32)

    def read(self, shard: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        d = self.shard_dir(shard)
        if not d.exists():
            empty = sp.csr_matrix((0, self.n_genes), dtype=self.dtypes["data"])
            return empty, np.zeros(0, np.int64), np.zeros((0, self.n_obs_cols), np.int32)
        arrays = {name: np.fromfile(d / name, dtype=self.dtypes[name]) for name in _NAMES}
        indptr = np.concatenate([[0], np.cumsum(arrays["rownnz"], dtype=np.int64)])
        shape = (len(indptr) - 1, self.n_genes)
        csr = sp.csr_matrix((arrays["data"], arrays["indices"].astype(np.int32, copy=False), indptr), shape=shape)
        return csr, arrays["cell_id"], arrays["obs"].reshape(-1, self.n_obs_cols)

    def remove(self, shard: int) -> None:
        """Free a shard's scratch files once it is written (disk use falls as pass 2 goes)."""
        shutil.rmtree(self.shard_dir(shard), ignore_errors=True)
