"""The streaming dataset: epoch plan -> block reads -> mixing window -> CSR batches.

Distributed contract: every rank builds its ``StreamingLoader`` with the same ``seed``,
``batch_size``, ``block_size`` and ``window_batches`` and its own ``rank``; the plan then
gives every rank the same number of batches per epoch (no DDP hang) and disjoint cells.
The stream state is global (``state_dict()`` is identical on every rank): save it once.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scpretrain.data_loader.readers import Block, Reader, ZarrReader, slice_rows
from scpretrain.data_loader.soma_reader import SomaReader
from scpretrain.sharding.manifest import read_manifest
from scpretrain.sharding.plan import (
    EpochOrder,
    Layout,
    StreamState,
    batches_per_rank,
    block_table,
    consumed_per_stream,
    resume_state,
    segment_length,
    stream_batches,
)


def _to_batch(block: Block, epoch: int) -> dict:
    return {
        "indptr": torch.from_numpy(block.indptr), "indices": torch.from_numpy(block.indices),
        "data": torch.from_numpy(block.data), "cell_id": torch.from_numpy(block.cell_id),
        "obs": dict(block.obs), "epoch": epoch,
    }


class CorpusDataset(IterableDataset):
    """One ``iter()`` streams the rest of one epoch for this rank (and DataLoader worker).

    With persistent workers, a worker's k-th ``iter()`` is epoch ``state.epoch + k``: the state
    is handed over when the workers start, so it is not re-read afterwards.
    """

    def __init__(self, reader, sizes: list[int], block_size: int, batch_size: int, window_batches: int,
                 rank: int, world_size: int, state: StreamState, read_ahead: int = 2):
        self.reader, self.sizes, self.block_size = reader, list(sizes), block_size
        self.batch_size, self.window_batches = batch_size, window_batches
        self.rank, self.world_size, self.state, self.read_ahead = rank, world_size, state, read_ahead
        self.table = block_table(self.sizes, block_size)
        self.n_cells = int(sum(self.sizes))
        self._iters = 0

    def layout(self, num_workers: int) -> Layout:
        return Layout(self.world_size, num_workers, self.batch_size, self.window_batches)

    def _read_window(self, order: EpochOrder, pos: np.ndarray) -> Block:
        shard, row = order.locate(pos)
        key = np.lexsort((row, shard))  # readers get the window sorted by (shard, row) ...
        inv = np.empty(len(key), dtype=np.int64)
        inv[key] = np.arange(len(key))
        return self.reader.read_window(shard[key], row[key], inv)  # ... and return it in mixed order

    def _windows(self, state: StreamState, layout: Layout, worker: int) -> Iterator[tuple]:
        """(read the next window, its batch cuts), lazily: the reads run where the caller wants."""
        order = EpochOrder(self.table, state.seed, state.epoch)
        skip = 0
        if state.layout == layout and state.batches:
            skip = consumed_per_stream(state.batches, layout)[worker]
        for pos, cuts in stream_batches(state, self.n_cells, layout, self.rank, worker, skip=skip):
            yield functools.partial(self._read_window, order, pos), cuts

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, k = (info.id, info.num_workers) if info else (0, 0)
        state = self.state if self._iters == 0 else StreamState(self.state.seed, self.state.epoch + self._iters)
        self._iters += 1
        tasks = self._windows(state, self.layout(k), worker)
        threads = 2
        if info is not None:
            # K worker processes already read K windows at once: one window and a share of the
            # decode threads each, so K workers do not oversubscribe the cores (or hold K x 2 windows)
            threads = 1
            self.reader.set_workers(k)
        depth = self.read_ahead
        limit = getattr(self.reader, "window_limit", None)
        if limit is not None:  # a reader with a memory budget: windows alive = read ahead + being read + consumed
            depth = min(depth, limit(self.batch_size * self.window_batches) - 1)
        if depth > 0:
            source = _prefetch(tasks, depth, threads)
        else:
            source = ((read(), cuts) for read, cuts in tasks)
        for item in source:
            block, cuts = item
            del item
            for lo, hi in cuts:
                yield _to_batch(slice_rows(block, lo, hi, threads), state.epoch)
            del block  # before the next window is read (no read ahead: one window in memory, not two)


def _prefetch(tasks: Iterator[tuple], depth: int, threads: int = 2) -> Iterator[tuple]:
    """Run ``(read, cuts)`` tasks ``depth`` ahead on ``threads`` threads; results in task order.

    Two windows in flight keep both cores busy: one window's single-threaded planning and its
    stragglers overlap with the other's decode and copy (the readers release the GIL). Leaving
    the loop early (break, exception, garbage collection) cancels what has not started and joins
    what has, so no thread is left inside a reader at interpreter exit.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max(1, min(threads, depth)), thread_name_prefix="loader-read-ahead")
    pending: deque = deque()
    try:
        for read, cuts in tasks:
            pending.append((pool.submit(read), cuts))
            if len(pending) > depth:
                fut, c = pending.popleft()
                yield fut.result(), c
        while pending:
            fut, c = pending.popleft()
            yield fut.result(), c
    finally:
        for fut, _ in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def stored_dtypes(manifest: dict) -> dict[str, np.dtype]:
    """The gene index and count dtypes a corpus's batches carry: its Zarr shards' widest, else what a SOMA-only
    build recorded; {} for corpora that recorded neither (the SOMA reader's own choice)."""
    for part in ("zarr", "soma"):
        dtypes = (manifest.get(part) or {}).get("dtypes") or {}
        if "data" in dtypes:
            return {k: np.dtype(v) for k, v in dtypes.items() if k in ("indices", "data")}
    return {}


PRESHUFFLED_BLOCK = 1024
UNSHUFFLED_BLOCK = 256
LEGACY_BLOCK = 256  # the default before stream states recorded their block size


def auto_block_size(preshuffled: bool) -> int:
    """Rows per I/O block when none is given.

    A corpus built by ``python -m sharding build`` (its Zarr shards or its SOMA experiment) holds its
    cells globally pre-shuffled, so a block of neighbours is already a random sample: large blocks
    (1,024 rows) cost no batch diversity and waste less of each decoded chunk (+10% cells/s over 256,
    BENCHMARKS.md). Another SOMA experiment (``soma_uri``: a Census slice, say) is usually sorted by
    dataset or cell type: 256-row blocks give a 32k-cell window 128 blocks to mix.
    """
    return PRESHUFFLED_BLOCK if preshuffled else UNSHUFFLED_BLOCK


class StreamingLoader:
    """Batches of CSR counts for one rank, with a global, resumable stream state.

    Args:
        corpus: a corpus directory (``python -m sharding build``); None to stream ``soma_uri`` as it is.
        backend: ``"zarr"`` (the corpus's shards) or ``"soma"`` (its TileDB-SOMA experiment).
        batch_size: cells per batch per rank.
        seed: must be equal on every rank.
        rank, world_size: default to torch.distributed's when initialised, else 0 and 1.
        num_workers: DataLoader worker processes (0 = read in this process with a read-ahead thread).
        block_size: rows per I/O block (None: ``auto_block_size``); window_batches: batches mixed
            together per window (``batch_size * window_batches`` cells are read and shuffled at once).
        obs_columns: obs columns to return with each batch (``cell_id`` always comes).
        split: stream only cells of this ``split`` ("train" by default; None = all) when the corpus
            was built with ``--holdout``; held-out cells are never trained on.
        soma_uri: another SOMA experiment to stream (backend "soma"); with ``census_organism`` a
            store with the Census layout, opened through ``cellxgene_census.open_soma(uri=...)``.
        soma_filter: an obs value filter (``"tissue_general == 'lung' and is_primary_data == True"``).
            Cells are named by the store's ``cell_id`` column, or by ``soma_joinid`` where it has none.
        soma_memory_budget: MiB the SOMA backend plans for (TileDB buffers, one query's results, the windows
            in flight; default ``soma_reader.DEFAULT_MEMORY_BUDGET_MB``): it sizes the queries and lowers
            ``read_ahead`` when windows are large. The Zarr backend ignores it.

    Each ``iter()`` yields the rest of the current epoch; the next one starts the next epoch.
    """

    def __init__(self, corpus: str | Path | None, backend: str = "zarr", batch_size: int = 64, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, num_workers: int = 0,
                 block_size: int | None = None, window_batches: int = 8, obs_columns: list[str] | tuple = (),
                 persistent_workers: bool = False, pin_memory: bool | None = None, read_ahead: int = 2,
                 soma_uri: str | None = None, soma_filter: str | None = None, census_organism: str | None = None,
                 split: str | None = "train", soma_memory_budget: int | None = None):
        if rank is None or world_size is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if on else 0
            world_size = dist.get_world_size() if on else 1
        if corpus is None and not (backend == "soma" and soma_uri):
            raise ValueError("corpus: required, except for backend='soma' with soma_uri (an existing SOMA "
                             "experiment or Census store streamed as it is)")
        self.corpus = Path(corpus) if corpus is not None else None
        self.manifest = read_manifest(self.corpus) if corpus is not None else {}
        # a split filter only where the corpus has held-out cells (else every cell is "train")
        self.split = split if self.manifest.get("splits") else None
        self.soma_memory_budget = soma_memory_budget
        self.reader = self._build_reader(backend, list(obs_columns), soma_uri, soma_filter, census_organism)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self._block_explicit = block_size is not None
        self.block_size = block_size if block_size is not None else auto_block_size(
            preshuffled=soma_uri is None)
        self.batch_size, self.window_batches = batch_size, window_batches
        self.persistent_workers = persistent_workers and num_workers > 0
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.read_ahead = read_ahead
        self.n_cells = int(sum(self.reader.sizes))
        self._state = StreamState(seed=seed)
        self._loader: DataLoader | None = None

    @classmethod
    def from_corpus(cls, corpus: str | Path, backend: str = "zarr", **options) -> StreamingLoader:
        """A corpus built by ``python -m sharding build``: its Zarr shards or (``backend="soma"``) its
        TileDB-SOMA experiment. ``options`` are the constructor's (batch_size, seed, rank, ...)."""
        return cls(corpus, backend=backend, **options)

    @classmethod
    def from_soma(cls, uri: str, *, value_filter: str | None = None, census_organism: str | None = None,
                  **options) -> StreamingLoader:
        """An existing SOMA experiment streamed as it is (no corpus); with ``census_organism`` a store with
        the Census layout, opened through ``cellxgene_census.open_soma(uri=...)``."""
        return cls(None, backend="soma", soma_uri=uri, soma_filter=value_filter, census_organism=census_organism,
                   **options)

    def _build_reader(self, backend, obs_columns, soma_uri, soma_filter, organism) -> Reader:
        if backend == "zarr":
            if not self.manifest.get("zarr"):
                raise ValueError(f"{self.corpus}/manifest.json: corpus has no Zarr shards; build with --format zarr|both or use backend='soma'")
            reader = ZarrReader(self.corpus, self.manifest, obs_columns, split=self.split)
            reader.check_files()  # a missing chunk stops here, naming it, not as zeros mid-epoch
            return reader
        if backend == "soma":
            uri = soma_uri
            if uri is None:
                if not self.manifest.get("soma"):
                    raise ValueError(f"{self.corpus}/manifest.json: corpus has no SOMA experiment; build with --format soma|both or use backend='zarr'")
                uri = str(self.corpus / self.manifest["soma"]["path"])
            sizes = None
            if self.split is not None and soma_uri is None:
                split_filter = f"split == '{self.split}'"
                soma_filter = f"({soma_filter}) and {split_filter}" if soma_filter else split_filter
            if soma_uri is None and soma_filter is None and self.manifest.get("zarr"):
                sizes = [int(sh["n_cells"]) for sh in self.manifest["zarr"]["shards"]]
            dtypes = {} if soma_uri is not None else stored_dtypes(self.manifest)
            return SomaReader(uri, obs_columns, value_filter=soma_filter, census_organism=organism, shard_sizes=sizes,
                              memory_budget_mb=self.soma_memory_budget, counts_dtype=dtypes.get("data", np.float32),
                              index_dtype=dtypes.get("indices"))
        raise ValueError(f"backend: {backend!r} is not one of 'zarr', 'soma'")

    @property
    def layout(self) -> Layout:
        return Layout(self.world_size, self.num_workers, self.batch_size, self.window_batches)

    @property
    def epoch(self) -> int:
        return self._state.epoch

    def batches_in_epoch(self) -> int:
        """Batches this rank will yield for the rest of the current epoch (equal on every rank)."""
        st = self._current_segment()
        return batches_per_rank(segment_length(self.n_cells, st), self.layout) - (
            st.batches if st.layout == self.layout else 0)

    def _current_segment(self) -> StreamState:
        st = self._state
        if st.layout is not None and st.layout != self.layout:
            st = resume_state(st, self.n_cells)
        return st

    def _dataloader(self, state: StreamState) -> DataLoader:
        ds = CorpusDataset(self.reader, self.reader.sizes, self.block_size, self.batch_size,
                           self.window_batches, self.rank, self.world_size, state, self.read_ahead)
        kw = {"prefetch_factor": 2, "persistent_workers": self.persistent_workers} if self.num_workers else {}
        if self.num_workers and isinstance(self.reader, SomaReader):
            # TileDB's thread pool does not survive fork(): forked workers deadlock in their first query.
            kw["multiprocessing_context"] = "spawn"
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **kw)

    def __iter__(self) -> Iterator[dict]:
        st = self._current_segment()
        fresh_epoch = st.layout is None and st.batches == 0 and len(st.prefix) == 0 and st.offset == 0
        reuse = self._loader is not None and self.persistent_workers and fresh_epoch and self._expect_epoch == st.epoch
        if not reuse:
            self._loader = self._dataloader(st)
            self._expect_epoch = st.epoch
        self._state = StreamState(st.seed, st.epoch, st.prefix, st.offset, self.layout,
                                  st.batches if st.layout == self.layout else 0, st.segment)
        for batch in self._loader:
            self._state.batches += 1
            yield batch
        self._state = StreamState(st.seed, st.epoch + 1)
        self._expect_epoch = st.epoch + 1

    def set_epoch(self, epoch: int) -> None:
        """Start (not resume) epoch ``epoch``: the plan's order depends on (seed, epoch) alone."""
        self._state = StreamState(self._state.seed, epoch)
        self._loader = None

    def state_dict(self) -> dict:
        """The global stream cursor (same on every rank); JSON-serialisable."""
        return {**self._state.to_dict(), "block_size": self.block_size}

    def load_state_dict(self, d: dict) -> None:
        """Continue exactly after the cells the saved topology consumed.

        Same topology: the identical batch sequence continues (resume equivalence). Another world
        size, worker count or batch size: exactly the cells not yet seen, re-dealt. The block size
        defines the epoch's order, so a saved one is adopted (an explicitly different one is refused).
        """
        if "corpora" in d:
            raise ValueError("stream state: saved by a MixedLoader (several corpora); resume it with the same "
                             "mix (data.mix), not a single corpus")
        # states saved before the block size was recorded were streamed with the then default, 256
        saved = d.get("block_size", LEGACY_BLOCK)
        if int(saved) != self.block_size:
            if self._block_explicit:
                raise ValueError(f"stream state: saved with block_size={saved}, this loader has block_size="
                                 f"{self.block_size}; the saved position only exists in the saved block order: "
                                 f"resume with block_size={saved} (data.block_size={saved}) or leave it unset")
            self.block_size = int(saved)
        self._state = StreamState.from_dict(d)
        self._loader = None
