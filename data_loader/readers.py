"""Block readers: rows of a corpus -> CSR counts + global cell ids + requested obs columns.

Two backends behind one interface (``read(shard, start, stop)``, ``read_window(shard, row, order)``,
``sizes``, ``set_workers(k)``); ``SomaReader`` lives in ``data_loader.soma_reader``:
* ``ZarrReader``: the corpus's AnnData Zarr shards, read array by array with zarr (the
  AnnData object layer is skipped: it is the slow part).
* ``SomaReader``: a TileDB-SOMA experiment -- the corpus's own, or any experiment with the
  Census layout (measurement ``RNA``, X layer ``raw``) with an optional obs value filter.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class Block:
    """CSR rows plus their global identity. ``obs`` maps column -> numpy array (object for text)."""

    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # uint16 (up to 65,536 genes) or int32 [nnz]
    data: np.ndarray  # uint16 (counts that fit) or float32 [nnz]
    cell_id: np.ndarray  # int64 [n]
    obs: dict[str, np.ndarray]
    # a window held in read order (SomaReader): its row i is stored row ``order[i]``, gathered by ``slice_rows``
    order: np.ndarray | None = None

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
        np.concatenate([b.cell_id for b in blocks]), {k: np.concatenate([b.obs[k] for b in blocks]) for k in blocks[0].obs})


@runtime_checkable
class Reader(Protocol):
    """What the stream asks of a backend (``ZarrReader``, ``SomaReader``). A reader is pickled into
    DataLoader workers, so it opens its files lazily, per process."""

    sizes: list[int]  # rows per shard, in corpus order (the epoch plan's unit)

    def read(self, shard: int, start: int, stop: int) -> Block:
        """Rows ``start:stop`` of ``shard`` in store order."""
        ...

    def read_window(self, shard: np.ndarray, row: np.ndarray, order: np.ndarray) -> Block:
        """The rows ``(shard[i], row[i])`` of a mixing window, returned in the order ``order``."""
        ...

    def set_workers(self, k: int) -> None:
        """This process is one of ``k`` DataLoader workers: take its share of decode threads."""
        ...


class BufferPool:
    """Large numpy buffers reused from window to window.

    A fresh buffer costs the kernel a page zeroing on first touch: a quarter of the Zarr path's time
    when every window allocated its own (perf: ``clear_page_erms``). A buffer is handed out again only
    when nothing else refers to it -- no batch, tensor or view made from it is alive (its reference
    count says so) -- so a consumer that keeps batches never sees them overwritten; it only makes the
    pool allocate. At most ``keep`` buffers are tracked; beyond that, old ones are left to the GC.
    """

    def __init__(self, keep: int = 32):
        self.keep = keep
        self._bufs: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, n: int, dtype: np.typing.DTypeLike) -> np.ndarray:
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


_NUMERIC = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32",
            "float64"}


class _Coded:
    """A text column as categories + int32 codes (the last category is None, for missing values)."""

    def __init__(self, categories: np.ndarray, codes: np.ndarray):
        self.categories, self.codes = categories, codes

    def __getitem__(self, rows) -> np.ndarray:
        return self.categories[self.codes[rows]]

    def values(self) -> np.ndarray:
        return self.categories[self.codes]

    def __len__(self) -> int:
        return len(self.codes)


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


def _scatter_rows_py(pos, src_off, src_len, out_ptr, idx_buf, dat_buf, out_idx, out_dat, base, ra, rb):  # pragma: no cover - numba target
    for j in range(ra, rb):
        m = src_len[j]
        s = src_off[j] - base
        o = out_ptr[pos[j]]
        out_idx[o:o + m] = idx_buf[s:s + m]
        out_dat[o:o + m] = dat_buf[s:s + m]


if _gather is not None:
    scatter_rows = numba.njit(cache=True, nogil=True)(_scatter_rows_py)
else:  # pragma: no cover
    scatter_rows = _scatter_rows_py


def window_layout(lengths: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of ``lengths`` non-zeros (sorted order) returned as rows ``order``: where each sorted row
    goes (``pos``) and the output's ``indptr``."""
    n = len(order)
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n, dtype=np.int64)
    out_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths[order], out=out_ptr[1:])
    return pos, out_ptr


GATHER_SPLIT_NNZ = 1 << 20  # below this a second thread costs more than it saves
_HELPER: dict[int, object] = {}  # pid -> executor


def _gather_helper():
    """The process's one helper thread for two-thread gathers (made on first use, and again after a fork)."""
    from concurrent.futures import ThreadPoolExecutor

    if os.getpid() not in _HELPER:
        _HELPER[os.getpid()] = ThreadPoolExecutor(1, thread_name_prefix="loader-gather")
    return _HELPER[os.getpid()]


def take_rows(block: Block, order: np.ndarray, pool: BufferPool | None = None, threads: int = 1) -> Block:
    """Rows of ``block`` in ``order`` (a permutation or subset); output buffers from ``pool`` when given;
    ``threads=2``: both halves at once (numba releases the GIL; SOMA's decode threads idle meanwhile)."""
    order = np.asarray(order, dtype=np.int64)
    lens = block.indptr[order + 1] - block.indptr[order]
    indptr = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    nnz = int(indptr[-1])
    if _gather is not None:
        idx = pool.get(nnz, block.indices.dtype) if pool else np.empty(nnz, dtype=block.indices.dtype)
        dat = pool.get(nnz, block.data.dtype) if pool else np.empty(nnz, dtype=block.data.dtype)
        if threads > 1 and nnz >= GATHER_SPLIT_NNZ:
            h = int(np.searchsorted(indptr, nnz // 2))  # rows [0, h) hold about half the non-zeros
            first = _gather_helper().submit(_gather, block.indptr, block.indices, block.data, order[:h],
                                            indptr[:h + 1], idx, dat)
            _gather(block.indptr, block.indices, block.data, order[h:], indptr[h:], idx, dat)
            first.result()
        else:
            _gather(block.indptr, block.indices, block.data, order, indptr, idx, dat)
    else:
        src = np.repeat(block.indptr[order] - indptr[:-1], lens) + np.arange(nnz, dtype=np.int64)
        idx, dat = block.indices[src], block.data[src]
    return Block(indptr, idx, dat, block.cell_id[order], {k: v[order] for k, v in block.obs.items()})


def slice_rows(block: Block, lo: int, hi: int, threads: int = 1) -> Block:
    """Rows [lo, hi) without copying the non-zeros (a block held in read order: gathered, on ``threads``)."""
    if block.order is not None:
        return take_rows(block, block.order[lo:hi], threads=threads)
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
                 cache_shards: int = 64, split: str | None = None):
        self.root = Path(corpus)
        self.paths = [self.root / s["path"] for s in manifest["zarr"]["shards"]]
        self.sizes = [int(s["n_cells"]) for s in manifest["zarr"]["shards"]]
        self.nnz = [s.get("nnz") for s in manifest["zarr"]["shards"]]
        self.shard_cells = list(self.sizes)  # the manifest's, before any split filter narrows ``sizes``
        self.obs_columns = list(obs_columns)
        # every batch carries the corpus's widest stored dtypes (older corpora: whatever the shards hold)
        self.dtypes = {k: np.dtype(v) for k, v in (manifest["zarr"].get("dtypes") or {}).items()}
        self.threads, self.cache_shards = threads, cache_shards
        self._threads_total = threads
        self.categories = {c: np.array([*v, None], dtype=object)
                           for c, v in (manifest.get("obs_categories") or {}).items()}
        self._open: dict[int, dict] = {}
        self._pool = None
        self._bufpool: BufferPool | None = None  # decode and window buffers, reused
        self._lock = threading.Lock()  # the shard cache and the lazily made pools
        # A split filter keeps, per shard, the (int32) rows of that split: 4 bytes per selected
        # cell, the only per-cell state; the plan then deals those rows as if they were the shard.
        self.rows: list[np.ndarray] | None = None
        if split is not None:
            self.rows = []
            for path in self.paths:
                col = self._obs_column(path, "split")
                vals = col.values() if isinstance(col, _Coded) else col
                self.rows.append(np.flatnonzero(vals == split).astype(np.int32))
            self.sizes = [len(r) for r in self.rows]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}, "_pool": None, "_bufpool": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _obs_column(self, path: Path, col: str):
        """One obs column of a shard, compact: a numeric array, or (categories, int32 codes) for text.

        Numeric arrays are read by the direct chunk decoder (no zarr-python); text columns (AnnData
        strings or categoricals) go through zarr once and are kept as codes, not one Python string
        per cell."""
        from scpretrain.data_loader.zarr_chunks import ChunkedArray

        node = path / "obs" / col
        try:
            meta = json.loads((node / "zarr.json").read_text())
        except FileNotFoundError:
            raise KeyError(f"{path}: obs column {col!r} not found; the corpus keeps "
                           f"{sorted(p.name for p in (path / 'obs').iterdir() if p.is_dir())}") from None
        if meta.get("node_type") == "array" and meta.get("data_type") in _NUMERIC:
            return np.asarray(ChunkedArray(node)[:])
        cats = self.categories.get(col)
        if (cats is not None and meta.get("attributes", {}).get("encoding-type") == "categorical"
                and (node / "codes" / "zarr.json").exists()):
            # our builder's shards: codes into the corpus-wide categories of the manifest
            codes = np.asarray(ChunkedArray(node / "codes")[:]).astype(np.int32)
            return _Coded(cats, np.where(codes >= 0, codes, len(cats) - 1).astype(np.int32))
        import zarr

        z = zarr.open_group(str(path / "obs"), mode="r")[col]
        if isinstance(z, zarr.Group):  # AnnData categorical: codes + categories
            codes = np.asarray(z["codes"][:]).astype(np.int32)
            cats = np.asarray(z["categories"][:], dtype=object)
        else:
            cats, codes = np.unique(np.asarray(z[:], dtype=object).astype(str), return_inverse=True)
            cats, codes = cats.astype(object), codes.astype(np.int32)
        return _Coded(np.append(cats, None), np.where(codes >= 0, codes, len(cats)).astype(np.int32))

    def _shard(self, shard: int) -> dict:
        """A shard's compact per-cell state, from an LRU cache; two read-ahead threads may ask at once."""
        with self._lock:
            if shard in self._open:
                self._open[shard] = arrs = self._open.pop(shard)  # most recent last
                return arrs
        arrs = self._open_shard(shard)
        with self._lock:
            self._open[shard] = arrs
            while len(self._open) > self.cache_shards:
                self._open.pop(next(iter(self._open)))
        return arrs

    def _open_shard(self, shard: int) -> dict:
        from scpretrain.data_loader.zarr_chunks import ChunkedArray

        self._executor()
        path = self.paths[shard]
        indptr = np.asarray(ChunkedArray(path / "X" / "indptr")[:], dtype=np.int64)
        want = self.nnz[shard]
        if want is not None and (len(indptr) != self.shard_cells[shard] + 1 or int(indptr[-1]) != int(want)):
            raise OSError(f"{path}: X/indptr holds {len(indptr) - 1} cells and {int(indptr[-1])} non-zeros, the "
                          f"manifest {self.shard_cells[shard]} and {want}; the shard is damaged or from another build: "
                          f"run `python -m sharding verify {self.root}` and rebuild the corpus")
        arrs = {"indptr": indptr,
                "indices": ChunkedArray(path / "X" / "indices", self._pool),
                "data": ChunkedArray(path / "X" / "data", self._pool),
                "cell_id": np.asarray(self._obs_column(path, "cell_id"), dtype=np.int64),
                "obs": {c: self._obs_column(path, c) for c in self.obs_columns}}
        return arrs

    def check_files(self) -> None:
        """Every chunk file of every shard's X/indices and X/data exists: a damaged corpus stops a run at step 0,
        naming the chunk (one directory listing per array; ``python -m sharding verify`` checks contents)."""
        from scpretrain.data_loader.zarr_chunks import check_chunk_files

        for path in self.paths:
            for name in ("indptr", "indices", "data"):
                check_chunk_files(path / "X" / name)

    def read_window(self, shard: np.ndarray, row: np.ndarray, order: np.ndarray) -> Block:
        """Cells ``(shard[j], row[j])``, given sorted by (shard, row), returned as rows ``order``.

        The fast path of the loader, with no per-cell Python: the chunks of ``indices``/``data`` the
        window touches are split into tasks of at most ``TASK_SLOTS`` consecutive needed chunks; a
        pool thread decodes a task's chunks side by side into small reused buffers (so a row never
        needs stitching) and one numba pass copies each of its rows into its place in the mixed
        window. That is one decode and one copy per non-zero; the batches are views of the result.
        """
        try:
            return self._read_window_direct(np.asarray(shard, dtype=np.int64), np.asarray(row, dtype=np.int64),
                                            np.asarray(order, dtype=np.int64))
        except _NoFastPath:  # a store layout the direct decoder does not handle: zarr-python reads it
            shards, first = np.unique(shard, return_index=True)
            pieces = []
            for s, a, b in zip(shards, first, [*first[1:], len(shard)]):
                pieces += self.read_runs(int(s), consecutive_runs(np.asarray(row[a:b])))
            blk = take_rows(concat_blocks(pieces), order)
            idx_dtype, dat_dtype = self._out_dtypes([blk.indices.dtype], [blk.data.dtype])
            blk.indices, blk.data = blk.indices.astype(idx_dtype, copy=False), blk.data.astype(dat_dtype, copy=False)
            return blk

    def _out_dtypes(self, idx: list, dat: list) -> tuple[np.dtype, np.dtype]:
        """The corpus's dtypes for every batch (manifest), else the widest of what was read."""
        i = self.dtypes.get("indices")
        d = self.dtypes.get("data")
        i = i if i is not None else (np.result_type(*idx) if idx else np.dtype(np.int32))
        d = d if d is not None else (np.result_type(*dat) if dat else np.dtype(np.float32))
        return np.dtype(i), np.dtype(d)

    TASK_SLOTS = 32  # chunks a decode task handles at most (plus a row's overhang): ~4 MB per array

    def _read_window_direct(self, shard: np.ndarray, row: np.ndarray, order: np.ndarray) -> Block:
        n = len(row)
        shards, first = np.unique(shard, return_index=True)
        bounds = [*first[1:], n]
        src_off = np.zeros(n, dtype=np.int64)  # a row's first non-zero, in its shard's slot space
        src_len = np.zeros(n, dtype=np.int64)
        cell_id = np.empty(n, dtype=np.int64)
        obs_parts: dict[str, list[np.ndarray]] = {c: [] for c in self.obs_columns}
        tasks: list[tuple] = []  # (array pair, chunk ids, first slot, sorted rows [a, b))
        arrays = []
        C = 0
        for s, a, b in zip(shards, first, bounds):
            sh = self._shard(int(s))
            rows = row[a:b] if self.rows is None else self.rows[int(s)][row[a:b]].astype(np.int64)
            ptr = sh["indptr"]
            idx_arr, dat_arr = sh["indices"], sh["data"]
            if not (idx_arr.direct and dat_arr.direct and dat_arr.chunk == idx_arr.chunk
                    and C in (0, idx_arr.chunk)):
                raise _NoFastPath
            C = idx_arr.chunk
            arrays.append((idx_arr, dat_arr))
            starts, ends = ptr[rows], ptr[rows + 1]
            ln = ends - starts
            nonempty = ln > 0
            n_chunks = -(-int(ptr[-1]) // C)
            c0 = np.minimum(starts // C, max(n_chunks - 1, 0))
            c1 = np.where(nonempty, (ends - 1) // C, c0)
            mark = (np.bincount(c0[nonempty], minlength=n_chunks + 1)
                    - np.bincount(c1[nonempty] + 1, minlength=n_chunks + 1))
            need = np.flatnonzero(np.cumsum(mark)[:n_chunks] > 0)
            slot_of = np.zeros(max(n_chunks, 1), dtype=np.int64)
            slot_of[need] = np.arange(len(need))  # needed chunks of this shard, side by side
            s0 = np.where(nonempty, slot_of[c0], -1)
            s0 = np.maximum.accumulate(s0) if len(s0) else s0  # empty rows ride with their neighbour
            s0[s0 < 0] = 0
            s1 = np.maximum.accumulate(np.where(nonempty, slot_of[c1], 0)) if len(s0) else s0
            src_off[a:b] = s0 * C + np.where(nonempty, starts - c0 * C, 0)
            src_len[a:b] = ln
            # decode tasks: runs of rows whose first chunk falls in the same TASK_SLOTS-slot bin
            grp = s0 // self.TASK_SLOTS
            cuts = [0, *(np.flatnonzero(np.diff(grp)) + 1).tolist(), len(rows)]
            for ra, rb in zip(cuts[:-1], cuts[1:]):
                if rb > ra and nonempty[ra:rb].any():
                    lo, hi = int(s0[ra]), int(s1[rb - 1])
                    tasks.append((len(arrays) - 1, need[lo:hi + 1], lo, a + ra, a + rb))
            cell_id[a:b] = sh["cell_id"][rows]
            for c in self.obs_columns:
                obs_parts[c].append(sh["obs"][c][rows])
        idx_dtype, dat_dtype = self._out_dtypes([i.dtype for i, _ in arrays], [d.dtype for _, d in arrays])
        pos, out_ptr = window_layout(src_len, order)  # sorted row j goes to output row pos[j]
        bufs = self._buffers()
        out_idx = bufs.get(int(out_ptr[-1]), idx_dtype)  # the batches are views of these
        out_dat = bufs.get(int(out_ptr[-1]), dat_dtype)

        def run(task: tuple) -> None:
            k, chunk_ids, lo, ra, rb = task
            idx_arr, dat_arr = arrays[k]
            ib = bufs.get(len(chunk_ids) * C, idx_dtype)  # small, cache-warm for the copy below
            db = bufs.get(len(chunk_ids) * C, dat_dtype)
            for j, c in enumerate(chunk_ids.tolist()):
                idx_arr.decode_into(c, ib[j * C:(j + 1) * C])
                dat_arr.decode_into(c, db[j * C:(j + 1) * C])
            scatter_rows(pos, src_off, src_len, out_ptr, ib, db, out_idx, out_dat, lo * C, ra, rb)

        pool = self._executor()
        if pool is not None and len(tasks) > 1:
            list(pool.map(run, tasks))
        else:
            for t in tasks:
                run(t)
        obs = {c: np.concatenate(v)[order] if v else np.zeros(0, dtype=object) for c, v in obs_parts.items()}
        return Block(out_ptr, out_idx, out_dat, cell_id[order], obs)

    def set_workers(self, k: int) -> None:
        """In one of ``k`` DataLoader worker processes: a ``1/k`` share of the decode threads."""
        threads = max(1, self._threads_total // max(k, 1))
        if threads != self.threads:
            self.threads, self._pool = threads, None  # (a forked copy of the parent's pool has no threads)

    def _buffers(self) -> BufferPool:
        with self._lock:
            if self._bufpool is None:
                self._bufpool = BufferPool()
            return self._bufpool

    def _executor(self):
        with self._lock:
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
