"""Pass-1 scratch space: per-shard append-only files under DIR/.build/spool/.

Pass 1 deals every kept cell to a random destination shard. Rows are buffered in
memory per shard and appended to that shard's files when the buffer reaches a
byte budget, so memory is bounded by the budget (not the corpus) and the number
of files is a handful per shard (not per block x shard). Pass 2 reads one
shard's files back, bounded by cells-per-shard.

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

_FILES = {"data": np.float32, "indices": np.int32, "rownnz": np.int64, "cell_id": np.int64, "obs": np.int32}


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

    def shard_dir(self, shard: int) -> Path:
        return self.root / f"shard-{shard:05d}"

    def add(self, dest: np.ndarray, csr: sp.csr_matrix, cell_ids: np.ndarray, obs_codes: np.ndarray) -> None:
        """Buffer rows (one destination shard per row); flush when the buffer passes the budget."""
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
            for i, (name, dtype) in enumerate(_FILES.items()):
                with open(d / name, "ab") as f:
                    for piece in pieces:
                        np.ascontiguousarray(piece[i], dtype=dtype).tofile(f)
        self._buf.clear()
        self._bytes = 0

    def read(self, shard: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        d = self.shard_dir(shard)
        if not d.exists():
            empty = sp.csr_matrix((0, self.n_genes), dtype=np.float32)
            return empty, np.zeros(0, np.int64), np.zeros((0, self.n_obs_cols), np.int32)
        arrays = {name: np.fromfile(d / name, dtype=dtype) for name, dtype in _FILES.items()}
        indptr = np.concatenate([[0], np.cumsum(arrays["rownnz"])]).astype(np.int64)
        shape = (len(indptr) - 1, self.n_genes)
        csr = sp.csr_matrix((arrays["data"], arrays["indices"], indptr), shape=shape)
        return csr, arrays["cell_id"], arrays["obs"].reshape(-1, self.n_obs_cols)

    def remove(self, shard: int) -> None:
        """Free a shard's scratch files once it is written (disk use falls as pass 2 goes)."""
        shutil.rmtree(self.shard_dir(shard), ignore_errors=True)
