"""Several corpora mixed with weights: fixed proportions per batch, exactly-once per corpus epoch, resume."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from scpretrain.data_loader import MixedLoader
from scpretrain.data_loader.mix import split_batch
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def second_corpus(small_corpus, tmp_path_factory):
    """700 other synthetic cells over the small corpus's vocabulary."""
    out = tmp_path_factory.mktemp("corpus2") / "second"
    run_cli(["-m", "sharding", "build", "--source", "synthetic://cells=700,genes=300,types=5,datasets=2,seed=7",
             "--vocab", str(small_corpus / "vocab.tsv"), "--out", str(out), "--format", "zarr",
             "--cells-per-shard", "300"])
    return out


@pytest.mark.parametrize("bs, weights, sizes", [
    (16, [3, 1], [12, 4]),
    (10, [1, 1, 1], [4, 3, 3]),      # the largest remainder breaks the tie at the first corpus
    (5, [1000, 1], [4, 1]),          # every corpus keeps at least one cell
    (7, [0.5, 0.25, 0.25], [3, 2, 2]),  # 3.5, 1.75, 1.75: the two largest remainders get the rest
    (3, [1, 1, 1], [1, 1, 1]),
])
def test_split_batch_table(bs, weights, sizes):
    assert split_batch(bs, weights) == sizes
    assert sum(sizes) == bs


@pytest.mark.parametrize("bs, weights", [(2, [1, 1, 1]), (8, [1, 0]), (8, [1, -1]), (8, [])])
def test_split_batch_refuses(bs, weights):
    with pytest.raises(ValueError):
        split_batch(bs, weights)


def _mix(small, second, rank=0, world=1, **kw):
    return MixedLoader([small, second], [3, 1], batch_size=16, seed=0, rank=rank, world_size=world,
                       block_size=64, window_batches=4, obs_columns=["cell_type"], **kw)


def test_every_batch_holds_both_corpora_and_each_cell_once_per_its_epoch(small_corpus, second_corpus):
    n0 = json.loads((small_corpus / "manifest.json").read_text())["n_cells"]
    n1 = json.loads((second_corpus / "manifest.json").read_text())["n_cells"]
    L = _mix(small_corpus, second_corpus)
    expected_batches = L.batches_in_epoch()
    seen0, seen1 = [], Counter()
    n_batches = 0
    for b in L:
        corpus = b["corpus"].numpy()
        ids = b["cell_id"].numpy()
        assert len(ids) == b["indptr"].numel() - 1 == len(b["obs"]["cell_type"])
        # exactly 12 + 4 cells but for the primary's last short batches
        assert (corpus == 1).sum() == 4 and 1 <= (corpus == 0).sum() <= 12
        seen0 += ids[corpus == 0].tolist()
        for cid, ep in zip(ids[corpus == 1], [b["epochs"][1]] * 4):
            seen1[(ep, int(cid))] += 1
        n_batches += 1
    assert n_batches == expected_batches
    assert len(seen0) == len(set(seen0)) and n0 - len(seen0) < 2  # primary: one epoch, exactly once
    # the secondary ran through about n_batches * 4 / n1 epochs, every cell at most once in each
    assert max(seen1.values()) == 1
    epochs = sorted({ep for ep, _ in seen1})
    assert len(epochs) >= 2  # 700 cells at 4 per batch roll over within one primary epoch
    for ep in epochs[:-1]:  # completed secondary epochs saw (nearly) every cell
        assert n1 - sum(1 for e, _ in seen1 if e == ep) < 2
    assert L.epoch == 1


def test_ranks_get_equal_batches_and_disjoint_cells(small_corpus, second_corpus):
    per_rank = []
    for r in range(2):
        L = _mix(small_corpus, second_corpus, rank=r, world=2)
        per_rank.append([(b["corpus"].numpy(), b["cell_id"].numpy(), b["epochs"]) for b in L])
    assert len(per_rank[0]) == len(per_rank[1])  # no DDP hang
    for c in (0, 1):  # within each epoch of each corpus, the ranks read disjoint cells
        a = [(ep[c], int(i)) for cs, ids, ep in per_rank[0] for i in ids[cs == c]]
        b = [(ep[c], int(i)) for cs, ids, ep in per_rank[1] for i in ids[cs == c]]
        assert len(a) == len(set(a)) and len(b) == len(set(b)) and not (set(a) & set(b))


def test_resume_mid_epoch_continues_exactly(small_corpus, second_corpus):
    full = [(b["corpus"].numpy(), b["cell_id"].numpy()) for b in _mix(small_corpus, second_corpus)]
    L = _mix(small_corpus, second_corpus)
    it = iter(L)
    head = [next(it) for _ in range(7)]
    state = json.loads(json.dumps(L.state_dict()))  # what a checkpoint stores
    del it
    R = _mix(small_corpus, second_corpus)
    R.load_state_dict(state)
    rest = [(b["corpus"].numpy(), b["cell_id"].numpy()) for b in R]
    got = [(b["corpus"].numpy(), b["cell_id"].numpy()) for b in head] + rest
    assert len(got) == len(full)
    for (c1, i1), (c2, i2) in zip(got, full):
        np.testing.assert_array_equal(c1, c2)
        np.testing.assert_array_equal(i1, i2)


def test_resume_under_another_world_size_sees_the_rest_of_the_primary(small_corpus, second_corpus):
    L = _mix(small_corpus, second_corpus, rank=0, world=1)
    it = iter(L)
    first = [next(it) for _ in range(9)]
    state = L.state_dict()
    del it
    seen = {int(i) for b in first for i in b["cell_id"].numpy()[b["corpus"].numpy() == 0]}
    rest = []
    for r in range(2):
        R = _mix(small_corpus, second_corpus, rank=r, world=2)
        R.load_state_dict(state)
        rest += [int(i) for b in R for i in b["cell_id"].numpy()[b["corpus"].numpy() == 0]]
    n0 = json.loads((small_corpus / "manifest.json").read_text())["n_cells"]
    assert len(rest) == len(set(rest)) and not (seen & set(rest))
    assert n0 - len(seen) - len(rest) < 3  # only the documented tail (< world size) is skipped


def test_mixing_refuses_other_vocabularies(small_corpus, tmp_path):
    other = tmp_path / "other"
    run_cli(["-m", "sharding", "build", "--source", "synthetic://cells=200,genes=120,types=3,datasets=1,seed=3",
             "--out", str(other), "--format", "zarr"])
    with pytest.raises(ValueError, match=r"other/manifest.json: vocab.sha256 differs"):
        MixedLoader([small_corpus, other], [1, 1], batch_size=8, seed=0, rank=0, world_size=1)
    with pytest.raises(ValueError, match="one weight per corpus"):
        MixedLoader([small_corpus, other], [1], batch_size=8, seed=0, rank=0, world_size=1)


def test_corpora_with_different_stored_dtypes_mix(small_corpus, tmp_path):
    """A uint16 corpus with an int32/float32 one: indices widen to int64, counts to float32."""
    wide = tmp_path / "wide"
    run_cli(["-m", "sharding", "build", "--source", "synthetic://cells=400,genes=300,types=5,datasets=2,seed=9",
             "--vocab", str(small_corpus / "vocab.tsv"), "--out", str(wide), "--format", "zarr",
             "--x-dtype", "float32"])
    L = MixedLoader([small_corpus, wide], [1, 1], batch_size=20, seed=0, rank=0, world_size=1, primary=1)
    b = next(iter(L))
    assert b["indices"].dtype == torch.int64 and b["data"].dtype == torch.float32
    assert b["epoch"] == L.loaders[1].epoch == 0 and (b["corpus"] == 1).sum() == 10
