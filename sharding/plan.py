"""The epoch plan: which (rank, worker) reads which cells, in what order. Pure and deterministic.

Vocabulary
----------
* A *block* is a run of at most ``block_size`` consecutive rows of one shard: the unit of I/O.
* The epoch's *base sequence* S0 is every block of the corpus, in an order drawn from
  ``(seed, epoch)`` alone, concatenated: position ``p`` of S0 is one cell.
* A *segment* is the sequence one training topology streams: the whole of S0 at the start of
  an epoch, or, after a resume, the cells not yet seen (``prefix`` positions of S0 followed by
  ``S0[offset:]``). A segment is dealt to ``V = world_size * max(workers, 1)`` *streams*
  (rank r, worker w is stream ``r * K + w``).
* A *super-round* covers ``V * B * R`` consecutive segment positions (B = batch size,
  R = ``window_batches``); stream v reads the v-th window of ``B * R`` positions, shuffles it
  (the mixing buffer) and cuts R batches.
* Tail policy: what is left after the last full super-round (``L`` positions) is split into V
  windows of ``L // V`` cells, each cut into batches of B with one short last batch; the
  ``L % V`` (< V) remaining cells are skipped this epoch (a different few each epoch, since
  the order changes). Every other cell is read exactly once per epoch, and every stream --
  hence every rank -- gets exactly the same number of batches.

A DataLoader with K workers yields its workers' batches round-robin, so rank r's i-th batch
comes from stream ``r*K + i % K`` (its ``i // K``-th batch). A resumed topology therefore only
needs the global number of batches each rank consumed (equal on all ranks) to know exactly
which cells were seen, whatever the new world size or worker count.

Memory: O(number of blocks) for the block order plus O(V * B * R) for a resume prefix;
nothing per cell of the corpus.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Layout:
    """A training topology as seen by the data stream."""

    world_size: int
    num_workers: int  # DataLoader workers per rank; 0 means the rank's own process
    batch_size: int
    window_batches: int = 8

    def __post_init__(self) -> None:
        for name in ("world_size", "batch_size", "window_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"Layout.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"Layout.num_workers must be >= 0, got {self.num_workers}")

    @property
    def workers(self) -> int:
        return max(self.num_workers, 1)

    @property
    def n_streams(self) -> int:
        return self.world_size * self.workers

    @property
    def window(self) -> int:
        return self.batch_size * self.window_batches


@dataclass
class StreamState:
    """The global stream cursor: identical on every rank, saved once (by rank 0).

    ``prefix``/``offset`` describe the current segment (see module docstring); ``layout`` is
    the topology that streamed it and ``batches`` how many batches each rank consumed of it.
    """

    seed: int
    epoch: int = 0
    prefix: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    offset: int = 0
    layout: Layout | None = None
    batches: int = 0
    segment: int = 0  # counts resumes within the epoch; part of every window's shuffle seed

    def to_dict(self) -> dict:
        return {
            "seed": self.seed, "epoch": self.epoch, "prefix": self.prefix.astype(np.int64).tolist(),
            "offset": self.offset, "batches": self.batches, "segment": self.segment,
            "layout": None if self.layout is None else vars(self.layout).copy(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        return cls(
            seed=int(d["seed"]), epoch=int(d["epoch"]), prefix=np.asarray(d["prefix"], dtype=np.int64),
            offset=int(d["offset"]), batches=int(d["batches"]), segment=int(d.get("segment", 0)),
            layout=None if d["layout"] is None else Layout(**d["layout"]),
        )


# ---------------------------------------------------------------- blocks and the base sequence

@dataclass(frozen=True)
class BlockTable:
    """Blocks of all shards: block i is rows [start[i], stop[i]) of shard[i]."""

    shard: np.ndarray
    start: np.ndarray
    stop: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        return self.stop - self.start

    def __len__(self) -> int:
        return len(self.shard)


def block_table(shard_sizes: list[int] | np.ndarray, block_size: int) -> BlockTable:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    shards, starts, stops = [], [], []
    for s, n in enumerate(shard_sizes):
        st = np.arange(0, int(n), block_size, dtype=np.int64)
        shards.append(np.full(len(st), s, dtype=np.int64))
        starts.append(st)
        stops.append(np.minimum(st + block_size, int(n)))
    def cat(xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)

    return BlockTable(cat(shards), cat(starts), cat(stops))


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


class EpochOrder:
    """S0 for one epoch: a permutation of the blocks drawn from (seed, epoch) alone."""

    def __init__(self, table: BlockTable, seed: int, epoch: int):
        self.table = table
        self.order = _rng(seed, epoch, 0xB10C).permutation(len(table))
        sizes = table.sizes[self.order]
        self.cum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @property
    def n_cells(self) -> int:
        return int(self.cum[-1])

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """S0 positions -> (shard, row) arrays."""
        k = np.searchsorted(self.cum, positions, side="right") - 1
        blk = self.order[k]
        return self.table.shard[blk], self.table.start[blk] + (positions - self.cum[k])


# ---------------------------------------------------------------- dealing a segment to streams

@dataclass(frozen=True)
class Window:
    """Stream-local unit of mixing: segment positions [start, start + length), cut into batches."""

    index: int  # window number within its stream
    start: int
    length: int
    batch_size: int

    @property
    def n_batches(self) -> int:
        return -(-self.length // self.batch_size)


def segment_length(n_cells: int, state: StreamState) -> int:
    return len(state.prefix) + n_cells - state.offset


def stream_windows(seg_len: int, layout: Layout, stream: int) -> list[Window]:
    """Windows of one stream over a segment of ``seg_len`` positions (see tail policy)."""
    V, B, W = layout.n_streams, layout.batch_size, layout.window
    n_full = seg_len // (V * W)
    wins = [Window(j, j * V * W + stream * W, W, B) for j in range(n_full)]
    q = (seg_len - n_full * V * W) // V
    if q > 0:
        wins.append(Window(n_full, n_full * V * W + stream * q, q, B))
    return wins


def batches_per_rank(seg_len: int, layout: Layout) -> int:
    """Exactly equal on every rank: each of its K streams has the same window structure."""
    return layout.workers * sum(w.n_batches for w in stream_windows(seg_len, layout, 0))


def window_permutation(state: StreamState, stream: int, window: Window) -> np.ndarray:
    return _rng(state.seed, state.epoch, state.segment, stream, window.index).permutation(window.length)


def segment_positions(state: StreamState, seg_pos: np.ndarray) -> np.ndarray:
    """Segment positions -> S0 positions."""
    n_pre = len(state.prefix)
    out = np.asarray(seg_pos, dtype=np.int64) - n_pre + state.offset
    in_pre = seg_pos < n_pre
    if in_pre.any():
        out[in_pre] = state.prefix[seg_pos[in_pre]]
    return out


def consumed_per_stream(batches: int, layout: Layout) -> list[int]:
    """Batches each of a rank's K streams delivered after the rank consumed ``batches``."""
    K = layout.workers
    return [batches // K + (1 if w < batches % K else 0) for w in range(K)]


def stream_batches(state: StreamState, n_cells: int, layout: Layout, rank: int, worker: int,
                   skip: int = 0) -> Iterator[tuple[np.ndarray, list[tuple[int, int]]]]:
    """Yield (window, S0 positions of the window in shuffled order, batch slices) for one stream.

    The first ``skip`` batches of the stream are not yielded (resume within a segment).
    Each item is ``(s0_positions_of_window_in_mixed_order, [(lo, hi), ...])`` where the
    slices cut the window into its remaining batches.
    """
    stream = rank * layout.workers + worker
    seg_len = segment_length(n_cells, state)
    for win in stream_windows(seg_len, layout, stream):
        if skip >= win.n_batches:
            skip -= win.n_batches
            continue
        perm = window_permutation(state, stream, win)
        pos = segment_positions(state, win.start + perm)
        cuts = [(b * win.batch_size, min((b + 1) * win.batch_size, win.length)) for b in range(skip, win.n_batches)]
        skip = 0
        yield pos, cuts


def resume_state(state: StreamState, n_cells: int) -> StreamState:
    """The state of a new segment holding exactly the cells the old topology did not deliver.

    Call with the state saved at a checkpoint (``layout`` and ``batches`` set). The result has
    no layout: any world size or worker count can stream it.
    """
    layout = state.layout
    if layout is None or state.batches == 0:
        return StreamState(state.seed, state.epoch, state.prefix, state.offset, None, 0, state.segment)
    seg_len = segment_length(n_cells, state)
    if state.batches >= batches_per_rank(seg_len, layout):
        return StreamState(state.seed, state.epoch + 1)  # the epoch is complete
    per_stream = consumed_per_stream(state.batches, layout)
    # Every super-round strictly below `lo` is fully consumed by all streams; nothing at or
    # above `hi` has been touched. Only [lo, hi) needs a per-position seen mask.
    V, W = layout.n_streams, layout.window
    rounds_done = [n // layout.window_batches for n in per_stream]
    lo = min(rounds_done) * V * W
    hi = min(seg_len, (max(rounds_done) + 1) * V * W)
    seen = np.zeros(hi - lo, dtype=bool)
    for rank in range(layout.world_size):
        for w, n in enumerate(per_stream):
            stream = rank * layout.workers + w
            for win in stream_windows(seg_len, layout, stream):
                if n <= 0:
                    break
                take = min(n, win.n_batches)
                n -= take
                if win.start + win.length <= lo:
                    continue
                perm = window_permutation(state, stream, win)
                got = win.start + perm[: min(take * win.batch_size, win.length)]
                seen[got - lo] = True
    # Tail cells skipped by the old topology (L % V) lie inside [lo, hi) only when the tail
    # round was reached; they stay unseen and are offered to the new topology.
    left = lo + np.flatnonzero(~seen)
    rest_prefix = np.arange(hi, len(state.prefix), dtype=np.int64)  # prefix entries beyond hi
    new_prefix = np.concatenate([segment_positions(state, left), state.prefix[rest_prefix]])
    new_offset = state.offset + max(0, hi - len(state.prefix))
    return StreamState(state.seed, state.epoch, new_prefix.astype(np.int64), new_offset, None, 0,
                       state.segment + 1)
