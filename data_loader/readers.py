"""Block readers: rows of a corpus -> CSR counts + global cell ids + requested obs columns.

Two backends behind one interface (``Reader.read(shard, rows)``):
* ``ZarrReader``: the corpus's AnnData Zarr shards, read array by array with zarr (the
  AnnData object layer is skipped: it is the slow part).
* ``SomaReader``: a TileDB-SOMA experiment -- the corpus's own, or any experiment with the
  Census layout (measurement ``RNA``, X layer ``raw``) with an optional obs value filter.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Block:
    """CSR rows plus their global identity. ``obs`` maps column -> numpy array (object for text)."""

    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int32 [nnz]
    data: np.ndarray  # float32 [nnz]
    cell_id: np.ndarray  # int64 [n]
    obs: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.cell_id)


def concat_blocks(blocks: list[Block]) -> Block:
    offs = np.cumsum([0] + [b.indptr[-1] for b in blocks])
    indptr = np.concatenate([[0]] + [b.indptr[1:] - b.indptr[0] + o for b, o in zip(blocks, offs[:-1])])
    return Block(
        indptr.astype(np.int64),
        np.concatenate([b.indices for b in blocks]).astype(np.int32, copy=False),
        np.concatenate([b.data for b in blocks]).astype(np.float32, copy=False),
        np.concatenate([b.cell_id for b in blocks]),
        {k: np.concatenate([b.obs[k] for b in blocks]) for k in (blocks[0].obs if blocks else {})},
    )


def _gather_py(indptr, indices, data, order, out_ptr, out_idx, out_dat):  # pragma: no cover - numba target
    for i in range(order.shape[0]):
        r = order[i]
        a, b = indptr[r], indptr[r + 1]
        o = out_ptr[i]
        out_idx[o: o + b - a] = indices[a:b]
        out_dat[o: o + b - a] = data[a:b]


try:  # one pass over the non-zeros instead of numpy's repeat/arange/gather chain
    import numba

    _gather = numba.njit(cache=True, nogil=True)(_gather_py)
except ImportError:  # pragma: no cover
    _gather = None


def take_rows(block: Block, order: np.ndarray) -> Block:
    """Rows of ``block`` in ``order`` (a permutation or subset)."""
    order = np.asarray(order, dtype=np.int64)
    lens = block.indptr[order + 1] - block.indptr[order]
    indptr = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    nnz = int(indptr[-1])
    if _gather is not None:
        idx = np.empty(nnz, dtype=block.indices.dtype)
        dat = np.empty(nnz, dtype=block.data.dtype)
        _gather(block.indptr, block.indices, block.data, order, indptr, idx, dat)
    else:
        src = np.repeat(block.indptr[order] - indptr[:-1], lens) + np.arange(nnz, dtype=np.int64)
        idx, dat = block.indices[src], block.data[src]
    return Block(indptr, idx, dat, block.cell_id[order], {k: v[order] for k, v in block.obs.items()})


def slice_rows(block: Block, lo: int, hi: int) -> Block:
    """Rows [lo, hi) without copying the non-zeros."""
    a, b = int(block.indptr[lo]), int(block.indptr[hi])
    return Block(block.indptr[lo: hi + 1] - a, block.indices[a:b], block.data[a:b], block.cell_id[lo:hi],
                 {k: v[lo:hi] for k, v in block.obs.items()})


def consecutive_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted rows -> maximal [start, stop) runs of consecutive rows."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops)]


class ZarrReader:
    """Reads row ranges of the corpus's Zarr shards.

    Per shard, ``indptr`` and the obs columns (compact, per cell of that shard) are read once and
    kept for the ``cache_shards`` most recent shards; ``indices``/``data`` chunks are read and
    decoded directly (``zarr_chunks``) with a small thread pool, each chunk once per request.
    Opens lazily, so it pickles cheaply into DataLoader workers.
    """

    def __init__(self, corpus: str | Path, manifest: dict, obs_columns: list[str], threads: int = 2,
                 cache_shards: int = 16, split: str | None = None):
        self.root = Path(corpus)
        self.paths = [self.root / s["path"] for s in manifest["zarr"]["shards"]]
        self.sizes = [int(s["n_cells"]) for s in manifest["zarr"]["shards"]]
        self.obs_columns = list(obs_columns)
        self.threads, self.cache_shards = threads, cache_shards
        self._open: dict[int, dict] = {}
        self._pool = None
        # A split filter keeps, per shard, the (int32) rows of that split: 4 bytes per selected
        # cell, the only per-cell state; the plan then deals those rows as if they were the shard.
        self.rows: list[np.ndarray] | None = None
        if split is not None:
            import zarr

            self.rows = []
            for path in self.paths:
                col = self._obs_column(zarr.open_group(str(path), mode="r"), "split")
                self.rows.append(np.flatnonzero(col == split).astype(np.int32))
            self.sizes = [len(r) for r in self.rows]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}, "_pool": None}

    def _obs_column(self, g, col: str) -> np.ndarray:
        import zarr

        node = g[f"obs/{col}"]
        if isinstance(node, zarr.Group):  # AnnData categorical: codes + categories
            codes = np.asarray(node["codes"][:])
            cats = np.asarray(node["categories"][:], dtype=object)
            return np.where(codes >= 0, cats[np.maximum(codes, 0)], None)
        return np.asarray(node[:])

    def _shard(self, shard: int) -> dict:
        if shard in self._open:
            self._open[shard] = self._open.pop(shard)  # most recent last
            return self._open[shard]
        import zarr

        from data_loader.zarr_chunks import ChunkedArray

        if self._pool is None and self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads)
        path = self.paths[shard]
        g = zarr.open_group(str(path), mode="r")
        arrs = {"indptr": np.asarray(ChunkedArray(path / "X" / "indptr")[:], dtype=np.int64),
                "indices": ChunkedArray(path / "X" / "indices", self._pool),
                "data": ChunkedArray(path / "X" / "data", self._pool),
                "cell_id": np.asarray(self._obs_column(g, "cell_id"), dtype=np.int64),
                "obs": {c: self._obs_column(g, c) for c in self.obs_columns}}
        self._open[shard] = arrs
        while len(self._open) > self.cache_shards:
            self._open.pop(next(iter(self._open)))
        return arrs

    def read_runs(self, shard: int, runs: list[tuple[int, int]]) -> list[Block]:
        """Several row ranges of one shard; every compressed chunk is decoded once."""
        if self.rows is None:
            return self._read_physical(shard, runs)
        out = []
        for s, e in runs:  # local (split) rows -> physical runs -> one block per local run
            phys = consecutive_runs(self.rows[shard][s:e])
            out.append(concat_blocks(self._read_physical(shard, phys)))
        return out

    def _read_physical(self, shard: int, runs: list[tuple[int, int]]) -> list[Block]:
        a = self._shard(shard)
        ptr = a["indptr"]
        nz = [(int(ptr[s]), int(ptr[e])) for s, e in runs]
        idx = a["indices"].read_ranges(nz)
        dat = a["data"].read_ranges(nz)
        out = []
        for (s, e), (lo, _), i, d in zip(runs, nz, idx, dat):
            out.append(Block(ptr[s: e + 1] - lo, i, d, a["cell_id"][s:e], {c: v[s:e] for c, v in a["obs"].items()}))
        return out

    def read(self, shard: int, start: int, stop: int) -> Block:
        return self.read_runs(shard, [(start, stop)])[0]


class SomaReader:
    """Reads cells of a TileDB-SOMA experiment by local row (0..n-1 over the selected cells).

    ``uri`` is the experiment; ``census_organism`` switches to a Census-layout collection
    (``census_data/<organism>``) opened through ``cellxgene_census.open_soma(uri=...)``.
    """

    def __init__(self, uri: str, obs_columns: list[str], value_filter: str | None = None,
                 measurement: str = "RNA", layer: str = "raw", census_organism: str | None = None,
                 id_column: str = "cell_id", shard_sizes: list[int] | None = None):
        self.uri, self.value_filter = str(uri), value_filter
        self.measurement, self.layer, self.organism = measurement, layer, census_organism
        self.obs_columns, self.id_column = list(obs_columns), id_column
        self._exp = None
        self._ctx = None
        exp = self._experiment()
        if value_filter:
            tbl = exp.obs.read(value_filter=value_filter, column_names=["soma_joinid"]).concat()
            self.joinids = np.sort(tbl.column("soma_joinid").to_numpy())
        else:
            self.joinids = None  # identity: no per-cell array for an unfiltered experiment
        n = len(self.joinids) if self.joinids is not None else int(exp.obs.count)
        # Blocks over SOMA rows follow the corpus's shard boundaries when given (so the Zarr and
        # SOMA backends of one corpus stream the identical sequence); else one virtual shard.
        if shard_sizes is not None and sum(shard_sizes) == n:
            self.sizes = list(shard_sizes)
        else:
            self.sizes = [n]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_exp": None, "_ctx": None}

    def _experiment(self):
        if self._exp is None:
            if self.organism:
                import cellxgene_census

                self._ctx = cellxgene_census.open_soma(uri=self.uri)
                self._exp = self._ctx["census_data"][self.organism]
            else:
                import tiledbsoma

                self._exp = tiledbsoma.Experiment.open(self.uri)
        return self._exp

    def read(self, shard: int, start: int, stop: int) -> Block:
        return self.read_rows(self.offsets[shard] + np.arange(start, stop))

    def read_rows(self, rows: np.ndarray) -> Block:
        """Rows (local indices, any order) -> Block in that order."""
        import pyarrow as pa

        exp = self._experiment()
        jids = self.joinids[rows] if self.joinids is not None else np.asarray(rows, dtype=np.int64)
        order = np.argsort(jids, kind="stable")
        sorted_j = jids[order]
        X = exp.ms[self.measurement].X[self.layer]
        # Contiguous joinid runs (a window is made of blocks) are read as slices: TileDB point
        # queries over tens of thousands of ids are far slower than a few range queries.
        runs = consecutive_runs(sorted_j)
        if len(runs) <= max(1, len(sorted_j) // 16):
            tables = [t for a, b in runs for t in X.read(coords=(slice(a, b - 1),)).tables()]
        else:
            tables = list(X.read(coords=(pa.array(sorted_j),)).tables())
        tbl = pa.concat_tables(tables) if tables else None
        dim0 = tbl.column("soma_dim_0").to_numpy() if tbl is not None else np.zeros(0, np.int64)
        dim1 = tbl.column("soma_dim_1").to_numpy() if tbl is not None else np.zeros(0, np.int64)
        val = tbl.column("soma_data").to_numpy() if tbl is not None else np.zeros(0, np.float32)
        # TileDB's unordered results are ~15x faster than result_order="row-major"; a stable sort by
        # row here is cheap. (Columns within a row keep TileDB's order: consumers scatter, not search.)
        if len(dim0) > 1 and (np.any(np.diff(dim0) < 0)):
            o = np.argsort(dim0, kind="stable")
            dim0, dim1, val = dim0[o], dim1[o], val[o]
        # rows are sorted: each row's first entry by binary search (n searches, not one per non-zero)
        indptr = np.empty(len(sorted_j) + 1, dtype=np.int64)
        indptr[:-1] = np.searchsorted(dim0, sorted_j, side="left")
        indptr[-1] = len(dim0)
        cols = [self.id_column, *self.obs_columns] if self.id_column else list(self.obs_columns)
        names = ["soma_joinid", *cols]
        if len(runs) <= max(1, len(sorted_j) // 16):
            obs_tbl = pa.concat_tables([exp.obs.read(coords=(slice(a, b - 1),), column_names=names).concat()
                                        for a, b in runs])
        else:
            obs_tbl = exp.obs.read(coords=(pa.array(sorted_j),), column_names=names).concat()
        pos = np.searchsorted(sorted_j, obs_tbl.column("soma_joinid").to_numpy())
        obs = {}
        for c in cols:
            arr = obs_tbl.column(c).to_numpy(zero_copy_only=False)
            out = np.empty(len(sorted_j), dtype=arr.dtype)
            out[pos] = arr
            obs[c] = out
        cell_id = obs.pop(self.id_column).astype(np.int64) if self.id_column else sorted_j.copy()
        blk = Block(indptr, dim1.astype(np.int32), val.astype(np.float32), cell_id, obs)
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        return take_rows(blk, inv)
