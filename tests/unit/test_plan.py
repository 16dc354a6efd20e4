"""The epoch plan: exact values on uneven sizes, exactly-once, equal batches, resume anywhere."""
import numpy as np
import pytest

from scpretrain.sharding.plan import (EpochOrder, Layout, StreamState, batches_per_rank, block_table,
                           consumed_per_stream, resume_state, stream_batches, stream_windows)

SIZES = [1000, 737, 5, 2048]
N = sum(SIZES)


def rank_batches(state: StreamState, layout: Layout, rank: int) -> list[np.ndarray]:
    """A rank's batches in DataLoader order (workers' batches round-robin)."""
    streams = []
    for w in range(layout.workers):
        streams.append([pos[lo:hi] for pos, cuts in stream_batches(state, N, layout, rank, w) for lo, hi in cuts])
    out = []
    while any(streams):
        for s in streams:
            if s:
                out.append(s.pop(0))
    return out


def test_block_table_exact():
    t = block_table([5, 0, 3], 2)
    assert t.shard.tolist() == [0, 0, 0, 2, 2]
    assert t.start.tolist() == [0, 2, 4, 0, 2]
    assert t.stop.tolist() == [2, 4, 5, 2, 3]


def test_windows_and_tail_policy_exact():
    lay = Layout(world_size=2, num_workers=0, batch_size=3, window_batches=2)
    # 2 streams x window 6 = 12 per super-round; 29 positions -> 2 full rounds, tail 5 -> 2 each, 1 skipped
    assert [(w.start, w.length) for w in stream_windows(29, lay, 0)] == [(0, 6), (12, 6), (24, 2)]
    assert [(w.start, w.length) for w in stream_windows(29, lay, 1)] == [(6, 6), (18, 6), (26, 2)]
    assert batches_per_rank(29, lay) == 5


def test_epoch_order_covers_every_cell_once_and_changes_per_epoch():
    t = block_table(SIZES, 64)
    e0, e1 = EpochOrder(t, 7, 0), EpochOrder(t, 7, 1)
    s, r = e0.locate(np.arange(N))
    assert len(set(zip(s.tolist(), r.tolist()))) == N
    assert not np.array_equal(e0.order, e1.order)
    assert np.array_equal(e0.order, EpochOrder(t, 7, 0).order)  # (seed, epoch) alone decide


@pytest.mark.parametrize("layout", [Layout(1, 0, 16), Layout(3, 2, 16, 4), Layout(4, 3, 7, 3), Layout(2, 1, 500, 2)])
def test_disjoint_exactly_once_equal_batches(layout):
    st = StreamState(seed=3)
    per_rank = [rank_batches(st, layout, r) for r in range(layout.world_size)]
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1 and counts.pop() == batches_per_rank(N, layout)
    seen = np.concatenate([np.concatenate(b) for b in per_rank])
    assert len(seen) == len(np.unique(seen))
    assert N - len(seen) < layout.n_streams  # the documented tail: fewer than W*K cells skipped


@pytest.mark.parametrize("old,new,k", [
    (Layout(3, 2, 16, 4), Layout(2, 3, 8, 2), 7),
    (Layout(2, 0, 32, 2), Layout(5, 1, 32, 2), 20),
    (Layout(1, 4, 10, 3), Layout(3, 0, 10, 3), 1),
])
def test_resume_under_another_topology_yields_exactly_the_unseen(old, new, k):
    st = StreamState(seed=11, epoch=2)
    before = [rank_batches(st, old, r)[:k] for r in range(old.world_size)]
    seen = np.concatenate([np.concatenate(b) for b in before])
    saved = StreamState(seed=11, epoch=2, layout=old, batches=k)
    resumed = resume_state(StreamState.from_dict(saved.to_dict()), N)
    after = np.concatenate([np.concatenate(rank_batches(resumed, new, r)) for r in range(new.world_size)])
    assert len(np.intersect1d(seen, after)) == 0
    assert N - len(seen) - len(after) < new.n_streams
    # and a second resume in the middle of the resumed segment
    k2 = 2
    before2 = np.concatenate([np.concatenate(rank_batches(resumed, new, r)[:k2]) for r in range(new.world_size)])
    resumed.layout, resumed.batches = new, k2
    again = resume_state(resumed, N)
    rest = np.concatenate([np.concatenate(rank_batches(again, Layout(1, 0, 64), 0))])
    union = np.concatenate([seen, before2, rest])
    assert len(union) == len(np.unique(union))
    assert N - len(union) < 1 + new.n_streams


def test_consumed_per_stream_round_robin():
    assert consumed_per_stream(7, Layout(1, 3, 4)) == [3, 2, 2]
    assert consumed_per_stream(7, Layout(1, 0, 4)) == [7]


def test_completed_epoch_resumes_into_next():
    lay = Layout(2, 0, 100)
    st = StreamState(seed=0, epoch=4, layout=lay, batches=batches_per_rank(N, lay))
    nxt = resume_state(st, N)
    assert nxt.epoch == 5 and len(nxt.prefix) == 0 and nxt.offset == 0
