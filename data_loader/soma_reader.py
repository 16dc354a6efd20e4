"""The SOMA backend of the loader: cells of a TileDB-SOMA experiment (our corpus's, or any other with
the Census layout) read a window at a time, with the interface of ``data_loader.readers``."""
from __future__ import annotations

import queue
import threading

import numpy as np

from scpretrain.data_loader.readers import Block, BufferPool

MIB = 1 << 20
# Loader memory a SOMA reader plans for (``data.soma_memory_budget``, MiB): TileDB's buffers, one read's Arrow
# tables and the windows in flight. Chosen from the measurements in BENCHMARKS.md (SOMA memory).
DEFAULT_MEMORY_BUDGET_MB = 512


def _rows_unsorted_py(dim0, last):  # pragma: no cover - numba target
    """True when ``dim0`` is out of row order or starts before ``last`` (a branch-free pass: it vectorizes)."""
    bad = dim0[0] < last
    for i in range(1, dim0.shape[0]):
        bad |= dim0[i] < dim0[i - 1]
    return bad


def _copy_py(src, out):  # pragma: no cover - numba target
    for i in range(src.shape[0]):
        out[i] = src[i]


def _copy_counts_py(src, out):  # pragma: no cover - numba target
    """float32 counts -> uint16 through int32 (numba's direct float -> uint16 does not vectorize: 4x slower)."""
    for i in range(src.shape[0]):
        out[i] = np.int32(src[i])


def _count_rows_py(dim0, q, counts):  # pragma: no cover - numba target
    """Add each row's non-zeros of sorted ``dim0`` to ``counts`` (aligned with the sorted joinids ``q``): one
    binary search per row, so the pass reads a few entries per row, not all of them."""
    m = dim0.shape[0]
    i, j = 0, 0
    while i < m:
        r = dim0[i]
        lo, hi = i + 1, m
        while lo < hi:
            mid = (lo + hi) >> 1
            if dim0[mid] > r:
                hi = mid
            else:
                lo = mid + 1
        while q[j] < r:
            j += 1
        counts[j] += lo - i
        i = lo


try:
    import numba

    _jit = numba.njit(cache=True, nogil=True)
    _rows_unsorted, _copy, _copy_counts, _count_rows = (
        _jit(f) for f in (_rows_unsorted_py, _copy_py, _copy_counts_py, _count_rows_py))
except ImportError:  # pragma: no cover
    def _rows_unsorted(dim0, last):
        return bool(dim0[0] < last or np.any(dim0[1:] < dim0[:-1]))

    def _copy(src, out):
        out[:] = src

    _copy_counts = _copy

    def _count_rows(dim0, q, counts):
        counts += np.searchsorted(dim0, q, side="right") - np.searchsorted(dim0, q, side="left")


def _append_sorted(dim0, dim1, val, q, last, out_idx, out_dat, off, counts) -> bool:
    """Copy one result table into the window at ``off`` (gene index narrowed, value cast) and count each row's
    non-zeros; both ``dim0`` and the query's joinids ``q`` are sorted. Returns False, having written nothing,
    when ``dim0`` is out of row order (or before ``last``). Four passes that each vectorize (numba, no GIL) cost
    half of one fused merge walk (0.74 vs 1.30 s per 200k cells of ~1,440 non-zeros)."""
    m = len(dim0)
    if m == 0:
        return True
    if _rows_unsorted(dim0, last):
        return False
    _copy(dim1, out_idx[off:off + m])
    (_copy_counts if out_dat.dtype == np.uint16 else _copy)(val, out_dat[off:off + m])
    _count_rows(dim0, q, counts)
    return True


M_ARENA_MAX = -8  # glibc's mallopt parameter


def cap_malloc_arenas() -> bool:
    """Cap glibc's malloc arenas for this process (``SCPRETRAIN_MALLOC_ARENAS``, default 2; 0 leaves malloc as
    it is). TileDB runs each query step on a fresh thread, and each may get an arena of its own (up to 8 per
    core) that keeps the freed result buffers: the same 40 batches peaked anywhere between 0.59 and 0.80 GB
    from run to run; with 2 arenas 0.60-0.63 GB, flat from 200k to 2M cells, at the same speed (BENCHMARKS.md,
    SOMA memory). It takes effect for arenas made after it, so the reader sets it when it is made. Returns
    whether it was set."""
    import ctypes
    import os
    import sys

    n = int(os.environ.get("SCPRETRAIN_MALLOC_ARENAS", "2"))
    if n <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, n))
    except (OSError, AttributeError):  # not glibc
        return False


_QUERY_JOBS: queue.Queue | None = None
_QUERY_LOCK = threading.Lock()


def _run_in_query_thread(fn) -> threading.Event:
    """Run ``fn`` on the daemon thread every SOMA reader of the process shares (one thread: its allocations stay
    in one malloc arena; windows read at once take turns); the returned event is set when it has finished."""
    global _QUERY_JOBS
    with _QUERY_LOCK:
        if _QUERY_JOBS is None:
            _QUERY_JOBS = queue.Queue()
            threading.Thread(target=_query_worker, args=(_QUERY_JOBS,), name="soma-query", daemon=True).start()
    finished = threading.Event()
    _QUERY_JOBS.put((fn, finished))
    return finished


def _query_worker(jobs: queue.Queue) -> None:
    while True:
        fn, finished = jobs.get()
        try:
            fn()
        finally:
            finished.set()


def _grow(buf: np.ndarray, used: int, need: int) -> np.ndarray:
    out = np.empty(max(need, int(len(buf) * 1.5)), dtype=buf.dtype)
    out[:used] = buf[:used]
    return out


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


class SomaReader:
    """Reads cells of a TileDB-SOMA experiment by local row (0..n-1 over the selected cells).

    ``uri`` is the experiment; ``census_organism`` switches to a Census-layout collection
    (``census_data/<organism>``) opened through ``cellxgene_census.open_soma(uri=...)``.
    """

    def __init__(self, uri: str, obs_columns: list[str], value_filter: str | None = None,
                 measurement: str = "RNA", layer: str = "raw", census_organism: str | None = None,
                 id_column: str = "cell_id", shard_sizes: list[int] | None = None,
                 memory_budget_mb: int | None = None, counts_dtype: np.typing.DTypeLike = np.float32,
                 index_dtype: np.typing.DTypeLike | None = None):
        self.memory_budget = int(memory_budget_mb or DEFAULT_MEMORY_BUDGET_MB) * MIB
        cap_malloc_arenas()
        if self.memory_budget < 64 * MIB:
            raise ValueError(f"data.soma_memory_budget: {memory_budget_mb} MiB is below the 64 MiB a SOMA read needs; "
                             f"set 64 or more (default {DEFAULT_MEMORY_BUDGET_MB})")
        self.uri, self.value_filter = str(uri), value_filter
        # what the window holds and the batches carry: float32 (the SOMA type), or uint16 where the corpus's
        # manifest says every count fits (as the Zarr backend's batches do): 4 bytes a non-zero instead of 6
        self.counts_dtype = np.dtype(counts_dtype)
        if self.counts_dtype not in (np.dtype(np.float32), np.dtype(np.uint16)):
            raise ValueError(f"counts_dtype: {self.counts_dtype} is not float32 or uint16")
        self.measurement, self.layer, self.organism = measurement, layer, census_organism
        self.obs_columns, self.id_column = list(obs_columns), id_column
        self._local = threading.local()  # one open experiment per thread: two windows may be read at once
        exp = self._experiment()
        names = set(exp.obs.schema.names)
        if self.id_column and self.id_column not in names:
            self.id_column = None  # a store without our cell_id (the Census): soma_joinid names the cell
        missing = [c for c in self.obs_columns if c not in names]
        if missing:
            raise KeyError(f"{self.uri}: obs has no column(s) {missing}; it has {sorted(names)}")
        if value_filter:
            tbl = exp.obs.read(value_filter=value_filter, column_names=["soma_joinid"]).concat()
            self.joinids = np.sort(tbl.column("soma_joinid").to_numpy())
        else:
            self.joinids = None  # identity: no per-cell array for an unfiltered experiment
        if self.joinids is not None:
            n = len(self.joinids)
        elif shard_sizes is not None:
            n = int(sum(shard_sizes))  # our corpus: the manifest knows (obs.count costs ~9 B per cell of RSS)
        else:
            # unfiltered rows are read as soma_joinids 0..n-1; the domain is free, obs.count is not (+180 MB
            # of RSS at 20M cells, measured)
            dom = exp.obs.non_empty_domain()
            n = int(dom[0][1]) + 1 if dom and dom[0] is not None else 0
        # Blocks over SOMA rows follow the corpus's shard boundaries when given (so the Zarr and
        # SOMA backends of one corpus stream the identical sequence); else one virtual shard.
        if shard_sizes is not None and sum(shard_sizes) == n:
            self.sizes = list(shard_sizes)
        else:
            self.sizes = [n]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        X = exp.ms[self.measurement].X[self.layer]
        self.n_genes = int(X.shape[1])
        self.index_dtype = np.dtype(index_dtype or (np.uint16 if self.n_genes <= 65536 else np.int32))
        if self.index_dtype not in (np.dtype(np.uint16), np.dtype(np.int32)) or (
                self.index_dtype == np.uint16 and self.n_genes > 65536):
            raise ValueError(f"index_dtype: {self.index_dtype} cannot hold the gene index of {self.n_genes} genes")
        # the plan's first guess from the first 256 cells (X.nnz reads every fragment: 3 s at 200k cells),
        # refined by every window read
        self.nnz_per_row = 2000.0
        if n:
            import pyarrow as pa

            first = self.joinids[:256] if self.joinids is not None else np.arange(min(n, 256))
            got = sum(t.num_rows for t in X.read(coords=(pa.array(first),)).tables())
            self.nnz_per_row = max(1.0, got / len(first))
        self._bufs: BufferPool | None = None  # window buffers reused (no page zeroing per window)

    # --- memory plan -------------------------------------------------------------------------------

    def tiledb_config(self) -> dict:
        """TileDB settings from the budget: each column buffer of a read and TileDB's own working memory bounded
        (the defaults, 1 GiB per buffer in the Census's context, are what made one reader hold 6 GB)."""
        b = self.memory_budget
        return {"soma.init_buffer_bytes": int(min(128 * MIB, max(2 * MIB, b // 128))),
                "sm.mem.total_budget": int(b // 8)}

    @property
    def rows_per_read(self) -> int:
        """Cells per TileDB query, ~32M non-zeros (16,384 cells at ~1,500 per cell). Its results arrive as tables
        of ``soma.init_buffer_bytes`` per column, so the query size sets the per-query overhead, not the memory:
        with 8 MiB buffers, 16,384-cell queries read 43k cells/s where 4,096-cell ones read 36k (BENCHMARKS.md)."""
        return int(min(65536, max(1024, _pow2_floor(2 ** 25 / self.nnz_per_row))))

    @property
    def window_bytes_per_nnz(self) -> int:
        return self.index_dtype.itemsize + self.counts_dtype.itemsize

    def window_limit(self, window_rows: int) -> int:
        """Windows of ``window_rows`` cells that may exist at once (read ahead, being read, being consumed)
        within half the budget; at least 1."""
        window = max(1.0, window_rows * self.nnz_per_row * self.window_bytes_per_nnz)
        return max(1, int(self.memory_budget / 2 // window))

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "_bufs")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        cap_malloc_arenas()  # a spawned worker process
        self._local = threading.local()
        self._bufs = None

    def _experiment(self):
        loc = self._local
        if getattr(loc, "exp", None) is None:
            config = self.tiledb_config()
            if self.organism:
                import cellxgene_census

                loc.ctx = cellxgene_census.open_soma(uri=self.uri, tiledb_config=config)
                loc.exp = loc.ctx["census_data"][self.organism]
            else:
                import tiledbsoma

                loc.exp = tiledbsoma.Experiment.open(self.uri, context=tiledbsoma.SOMATileDBContext(
                    tiledb_config=config))
        return loc.exp

    def set_workers(self, k: int) -> None:
        """Nothing to share out: TileDB sizes its own thread pool."""

    def read(self, shard: int, start: int, stop: int) -> Block:
        n = stop - start
        return self.read_window(np.full(n, shard), np.arange(start, stop), np.arange(n))

    def read_rows(self, rows: np.ndarray) -> Block:
        """Rows (local indices, any order) -> Block in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        key = np.argsort(rows, kind="stable")
        order = np.empty(len(key), dtype=np.int64)
        order[key] = np.arange(len(key))
        return self._read_sorted(rows[key], order)

    def read_window(self, shard: np.ndarray, row: np.ndarray, order: np.ndarray) -> Block:
        """Cells ``(shard[j], row[j])``, sorted by (shard, row), returned as rows ``order``."""
        return self._read_sorted(self.offsets[np.asarray(shard)] + np.asarray(row), np.asarray(order))

    def _tables(self, X, jids: np.ndarray):
        """(start, joinids, Arrow table) for each result table of each query of ``rows_per_read`` cells, then
        (start, joinids, None) to close the query. TileDB reads in a helper thread (it releases the GIL) while
        this thread copies; at most two tables wait between them, so memory does not grow with the query.
        The query thread is the process's one long-lived one (``_run_in_query_thread``): a new thread per
        window left each window's buffers in a fresh malloc arena (RSS crept up 40% over 30 windows)."""
        import pyarrow as pa

        step, done = self.rows_per_read, object()
        box: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    box.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for a in range(0, len(jids), step):
                    q = jids[a:a + step]
                    for t in X.read(coords=(pa.array(q),)).tables():
                        if not put((a, q, t)):
                            return
                    if not put((a, q, None)):
                        return
                put(done)
            except BaseException as e:  # noqa: BLE001 - handed to the reading thread, raised there
                put(e)

        finished = _run_in_query_thread(produce)
        try:
            while True:
                item = box.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                del item
        finally:
            stop.set()
            finished.wait()

    @staticmethod
    def _reorder(out_idx, out_dat, start: int, stop: int, q: np.ndarray, counts: np.ndarray, late: list) -> int:
        """One query's region [start, stop) in row order, merged with its out-of-order tables ``late``."""
        rows = [np.repeat(q, counts), *(d0 for d0, _, _ in late)]
        cols = [out_idx[start:stop].copy(), *(d1 for _, d1, _ in late)]
        vals = [out_dat[start:stop].copy(), *(v for _, _, v in late)]
        row, col, val = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        o = np.argsort(row, kind="stable")
        end = start + len(row)
        out_idx[start:end], out_dat[start:end] = col[o], val[o]
        counts[:] = np.searchsorted(row[o], q, side="right") - np.searchsorted(row[o], q, side="left")
        return end

    def _read_sorted(self, rows: np.ndarray, order: np.ndarray) -> Block:
        """Local rows, sorted, read in queries of ``rows_per_read`` cells, each query's Arrow tables copied into
        the window as they arrive; returned in read order with ``order`` (``slice_rows`` gathers each batch).

        Memory: the window once (uint16 gene index + float32 value per non-zero) plus one query's tables,
        instead of the whole window's Arrow tables plus a permuted copy. Each query sends TileDB its joinids
        (merged into ranges) and takes the unordered results (~15x faster than row-major), sorted by row only
        when they arrive out of order.
        """
        import pyarrow as pa

        exp = self._experiment()
        jids = self.joinids[rows] if self.joinids is not None else np.asarray(rows, dtype=np.int64)
        X = exp.ms[self.measurement].X[self.layer]
        n = len(jids)
        if self._bufs is None:
            # an index and a value buffer per window alive (two with read-ahead): an outgrown pair is freed
            self._bufs = BufferPool(keep=4)
        cap = int(n * self.nnz_per_row * 1.5) + 1024  # untouched pages of the slack are never resident
        out_idx, out_dat = self._bufs.get(cap, self.index_dtype), self._bufs.get(cap, self.counts_dtype)
        counts = np.zeros(n, dtype=np.int64)
        nnz, last, q_nnz, late = 0, -1, 0, None
        for a, q, tbl in self._tables(X, jids):
            if tbl is None:  # the query is complete
                if late is not None:  # its results came out of row order: put its region in order
                    need = nnz + sum(len(d0) for d0, _, _ in late)
                    if need > len(out_idx):
                        out_idx, out_dat = _grow(out_idx, nnz, need), _grow(out_dat, nnz, need)
                    nnz = self._reorder(out_idx, out_dat, q_nnz, nnz, q, counts[a:a + len(q)], late)
                last, q_nnz, late = -1, nnz, None
                continue
            dim0 = tbl.column("soma_dim_0").to_numpy()
            dim1 = tbl.column("soma_dim_1").to_numpy()
            val = tbl.column("soma_data").to_numpy()
            del tbl
            m = len(dim0)
            if not m:
                continue
            if nnz + m > len(out_idx):  # more non-zeros than planned: grow by half again
                out_idx, out_dat = _grow(out_idx, nnz, nnz + m), _grow(out_dat, nnz, nnz + m)
            if late is not None or not _append_sorted(dim0, dim1, val, q, last, out_idx, out_dat, nnz,
                                                      counts[a:a + len(q)]):
                late = late if late is not None else []  # rare (several fragments): kept aside, sorted at the end
                late.append((dim0.copy(), dim1.copy(), val.copy()))
                continue
            nnz += m
            last = int(dim0[-1])
            del dim0, dim1, val
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        if n:  # what this store really holds per cell plans the next windows
            self.nnz_per_row = 0.5 * self.nnz_per_row + 0.5 * max(1.0, nnz / n)
        cols = [self.id_column, *self.obs_columns] if self.id_column else list(self.obs_columns)
        obs = {}
        if cols and n:
            obs_tbl = exp.obs.read(coords=(pa.array(jids),), column_names=["soma_joinid", *cols]).concat()
            at = np.searchsorted(jids, obs_tbl.column("soma_joinid").to_numpy())
            for c in cols:
                arr = obs_tbl.column(c).to_numpy(zero_copy_only=False)
                col = np.empty(n, dtype=arr.dtype)
                col[at] = arr
                obs[c] = col
        for c in cols:  # an empty read still carries every column
            obs.setdefault(c, np.zeros(0, dtype=object))
        cell_id = obs.pop(self.id_column).astype(np.int64) if self.id_column else jids.copy()
        order = np.asarray(order, dtype=np.int64)
        identity = len(order) == n and bool(np.all(order == np.arange(n)))
        return Block(indptr, out_idx[:nnz], out_dat[:nnz], cell_id, obs, order=None if identity else order)
