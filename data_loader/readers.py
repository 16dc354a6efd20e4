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
    """Rows of ``blocks`` one after the other; dtypes are promoted, never narrowed."""
    if not blocks:
        return Block(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32),
                     np.zeros(0, np.int64), {})
    if len(blocks) == 1:
        return blocks[0]
    offs = np.cumsum([0] + [b.indptr[-1] - b.indptr[0] for b in blocks])
    indptr = np.concatenate([[0]] + [b.indptr[1:] - b.indptr[0] + o for b, o in zip(blocks, offs[:-1])])
    return Block(
        indptr.astype(np.int64),
        np.concatenate([b.indices for b in blocks]),
        np.concatenate([b.data for b in blocks]),
        np.concatenate([b.cell_id for b in blocks]),
        {k: np.concatenate([b.obs[k] for b in blocks]) for k in blocks[0].obs},
    )


class BufferPool:
    """Large numpy buffers reused from window to window.

    A fresh buffer costs the kernel a page zeroing on first touch: a quarter of the Zarr path's time
    when every window allocated its own (perf: ``clear_page_erms``). A buffer is handed out again only
    when nothing else refers to it -- no batch, tensor or view made from it is alive (its reference
    count says so) -- so a consumer that keeps batches never sees them overwritten; it only makes the
    pool allocate. At most ``keep`` buffers are tracked; beyond that, old ones are left to the GC.
    """

    def __init__(self, keep: int = 32):
        import threading

        self.keep = keep
        self._bufs: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, n: int, dtype) -> np.ndarray:
        import sys

        dtype = np.dtype(dtype)
        with self._lock:
            best = -1
            for i in range(len(self._bufs)):
                b = self._bufs[i]
                # 3 = the list, ``b`` and getrefcount's argument: no view or tensor of it is alive
                if b.dtype == dtype and b.size >= n and sys.getrefcount(b) <= 3:
                    if best < 0 or b.size < self._bufs[best].size:
                        best = i
            if best >= 0:
                buf = self._bufs.pop(best)
            else:
                buf = np.empty(max(1, int(n * 1.1)), dtype=dtype)
            self._bufs.append(buf)  # most recently used last
            while len(self._bufs) > self.keep:
                self._bufs.pop(0)
            return buf[:n]


class _NoFastPath(Exception):
    """A shard whose layout the direct chunk decoder does not handle (zarr-python reads it instead)."""


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


def _gather_window_py(order, src_off, src_len, out_ptr, idx_buf, dat_buf, out_idx, out_dat, lo, hi):  # pragma: no cover
    for i in range(lo, hi):
        j = order[i]
        s = src_off[j]
        o = out_ptr[i]
        m = src_len[j]
        out_idx[o:o + m] = idx_buf[s:s + m]
        out_dat[o:o + m] = dat_buf[s:s + m]


if _gather is not None:
    _gather_window = numba.njit(cache=True, nogil=True)(_gather_window_py)
else:  # pragma: no cover
    _gather_window = _gather_window_py


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
        # every batch carries the corpus's widest stored dtypes (older corpora: whatever the shards hold)
        self.dtypes = {k: np.dtype(v) for k, v in (manifest["zarr"].get("dtypes") or {}).items()}
        self.threads, self.cache_shards = threads, cache_shards
        self._open: dict[int, dict] = {}
        self._pool = None
        self._bufpool: BufferPool | None = None  # decode and window buffers, reused
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
        return {**self.__dict__, "_open": {}, "_pool": None, "_bufpool": None}

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

        self._executor()
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

    def read_window(self, shard: np.ndarray, row: np.ndarray, order: np.ndarray) -> Block:
        """Cells ``(shard[j], row[j])``, given sorted by (shard, row), returned as rows ``order``.

        The fast path of the loader, with no per-cell Python: every chunk of ``indices``/``data``
        that the window touches is decoded once, by the thread pool, straight into one buffer per
        array (consecutive chunks of a shard side by side, so a row never needs stitching); one
        numba pass then copies each row from there into its place in the mixed window. That is
        one decode and one copy per non-zero; the batches are views of the result.
        """
        try:
            return self._read_window_direct(np.asarray(shard, dtype=np.int64), np.asarray(row, dtype=np.int64),
                                            np.asarray(order, dtype=np.int64))
        except _NoFastPath:  # a store layout the direct decoder does not handle: zarr-python reads it
            shards, first = np.unique(shard, return_index=True)
            pieces = []
            for s, a, b in zip(shards, first, [*first[1:], len(shard)]):
                pieces += self.read_runs(int(s), consecutive_runs(np.asarray(row[a:b])))
            return take_rows(concat_blocks(pieces), order)

    def _read_window_direct(self, shard: np.ndarray, row: np.ndarray, order: np.ndarray) -> Block:
        n = len(row)
        shards, first = np.unique(shard, return_index=True)
        bounds = [*first[1:], n]
        src_off = np.zeros(n, dtype=np.int64)
        src_len = np.zeros(n, dtype=np.int64)
        cell_id = np.empty(n, dtype=np.int64)
        obs_parts: dict[str, list[np.ndarray]] = {c: [] for c in self.obs_columns}
        tasks: list[tuple] = []  # (ChunkedArray pair, chunk id, slot)
        slot = 0
        arrays = []
        for s, a, b in zip(shards, first, bounds):
            sh = self._shard(int(s))
            rows = row[a:b] if self.rows is None else self.rows[int(s)][row[a:b]].astype(np.int64)
            ptr = sh["indptr"]
            idx_arr, dat_arr = sh["indices"], sh["data"]
            arrays.append((idx_arr, dat_arr))
            C = idx_arr.chunk if idx_arr.direct else 0
            if not (idx_arr.direct and dat_arr.direct and dat_arr.chunk == C):
                raise _NoFastPath
            starts, ends = ptr[rows], ptr[rows + 1]
            ln = ends - starts
            nonempty = ln > 0
            c0 = starts // C
            c1 = np.where(nonempty, (ends - 1) // C, c0)
            n_chunks = -(-int(ptr[-1]) // C)
            mark = (np.bincount(c0[nonempty], minlength=n_chunks + 1)
                    - np.bincount(c1[nonempty] + 1, minlength=n_chunks + 1))
            need = np.flatnonzero(np.cumsum(mark)[:n_chunks] > 0)
            slot_of = np.zeros(n_chunks + 1, dtype=np.int64)
            slot_of[need] = slot + np.arange(len(need))
            src_off[a:b] = np.where(nonempty, slot_of[np.minimum(c0, n_chunks)] * C + (starts - c0 * C), 0)
            src_len[a:b] = ln
            tasks += [(len(arrays) - 1, int(c), slot + k) for k, c in enumerate(need)]
            slot += len(need)
            cell_id[a:b] = sh["cell_id"][rows]
            for c in self.obs_columns:
                obs_parts[c].append(sh["obs"][c][rows])
        C = arrays[0][0].chunk if arrays else 1
        idx_dtype = self.dtypes.get("indices") or (np.result_type(*[i.dtype for i, _ in arrays]) if arrays
                                                    else np.dtype(np.int32))
        dat_dtype = self.dtypes.get("data") or (np.result_type(*[d.dtype for _, d in arrays]) if arrays
                                                else np.dtype(np.float32))
        pool_ = self._buffers()
        idx_buf = pool_.get(slot * C, idx_dtype)
        dat_buf = pool_.get(slot * C, dat_dtype)

        def decode(part: list[tuple]) -> None:
            for k, c, sl in part:
                idx_arr, dat_arr = arrays[k]
                idx_arr.decode_into(c, idx_buf[sl * C:(sl + 1) * C])
                dat_arr.decode_into(c, dat_buf[sl * C:(sl + 1) * C])

        out_len = src_len[order]
        out_ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(out_len, out=out_ptr[1:])
        out_idx = pool_.get(int(out_ptr[-1]), idx_dtype)  # the batches are views of these
        out_dat = pool_.get(int(out_ptr[-1]), dat_dtype)

        def gather(lo_hi: tuple[int, int]) -> None:
            _gather_window(order, src_off, src_len, out_ptr, idx_buf, dat_buf, out_idx, out_dat, *lo_hi)

        pool = self._executor()
        parts = max(1, self.threads)
        if pool is not None and len(tasks) > 1:
            list(pool.map(decode, [tasks[i::parts] for i in range(parts)]))
            cut = np.searchsorted(out_ptr, np.linspace(0, out_ptr[-1], parts + 1)).clip(0, n)
            cut[0], cut[-1] = 0, n
            list(pool.map(gather, list(zip(cut[:-1].tolist(), cut[1:].tolist()))))
        else:
            decode(tasks)
            gather((0, n))
        obs = {c: np.concatenate(v)[order] if v else np.zeros(0, dtype=object) for c, v in obs_parts.items()}
        return Block(out_ptr, out_idx, out_dat, cell_id[order], obs)

    def _buffers(self) -> BufferPool:
        if self._bufpool is None:
            self._bufpool = BufferPool()
        return self._bufpool

    def _executor(self):
        if self._pool is None and self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads)
        return self._pool

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

    def read_window(self, shard: np.ndarray, row: np.ndarray, order: np.ndarray) -> Block:
        """Cells ``(shard[j], row[j])``, sorted by (shard, row), returned as rows ``order``."""
        return self.read_rows((self.offsets[shard] + row)[order])

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
