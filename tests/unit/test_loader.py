"""The real loader over a real corpus: exactly-once, equal batches, workers, resume anywhere, trace."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch

from scpretrain.data_loader import StreamingLoader, model_inputs
from scpretrain.scmodels import PreprocessSpec
from tests.conftest import run_cli


def epoch_ids(corpus, backend="zarr", world=1, workers=0, bs=64, seed=0, state=None, stop=None):
    per_rank, states = [], []
    for r in range(world):
        L = StreamingLoader(corpus, backend=backend, batch_size=bs, seed=seed, rank=r, world_size=world,
                            num_workers=workers, block_size=128, window_batches=4, obs_columns=["cell_type"])
        if state:
            L.load_state_dict(state)
        batches = []
        for b in L:
            batches.append(b["cell_id"].numpy())
            if stop and len(batches) == stop:
                break
        per_rank.append(batches)
        states.append(L.state_dict())
    return per_rank, states


def test_zarr_counts_equal_the_shards_exactly(small_corpus):
    man = json.loads((small_corpus / "manifest.json").read_text())
    truth = {}
    for s in man["zarr"]["shards"]:
        a = ad.read_zarr(small_corpus / s["path"])
        for cid, row in zip(a.obs["cell_id"].to_numpy(), a.X):
            truth[int(cid)] = row.toarray().ravel()
    L = StreamingLoader(small_corpus, batch_size=100, seed=1, rank=0, world_size=1)
    b = next(iter(L))
    x = model_inputs(b, man["n_genes"], PreprocessSpec(), "cpu")
    dense = np.expm1(x["x"].numpy())  # log1p of counts normalised to 1e4
    for i, cid in enumerate(b["cell_id"].tolist()):
        t = truth[cid]
        assert np.allclose(dense[i], t * 1e4 / t.sum(), rtol=1e-4)


@pytest.mark.parametrize("backend", ["zarr", "soma"])
def test_every_cell_once_equal_batches_across_ranks(small_corpus, backend):
    per_rank, _ = epoch_ids(small_corpus, backend, world=3, bs=50)
    assert len({len(b) for b in per_rank}) == 1  # no DDP hang
    ids = np.concatenate([np.concatenate(b) for b in per_rank])
    n = json.loads((small_corpus / "manifest.json").read_text())["n_cells"]
    assert len(ids) == len(np.unique(ids)) and n - len(ids) < 3


def test_backends_give_the_same_stream_and_workers_keep_exactly_once(small_corpus):
    z, _ = epoch_ids(small_corpus, "zarr", world=2, workers=0)
    s, _ = epoch_ids(small_corpus, "soma", world=2, workers=0)
    for r in range(2):  # zarr and soma: the identical batch sequence
        assert len(z[r]) == len(s[r]) and all(np.array_equal(x, y) for x, y in zip(z[r], s[r]))
    w, _ = epoch_ids(small_corpus, "zarr", world=2, workers=2)  # 4 streams, read by 2 worker processes each rank
    assert len(w[0]) == len(w[1])
    ids = np.concatenate([np.concatenate(b) for b in w])
    n = json.loads((small_corpus / "manifest.json").read_text())["n_cells"]
    assert len(ids) == len(np.unique(ids)) and n - len(ids) < 4


def test_resume_with_another_world_size_and_workers_sees_the_rest(small_corpus):
    first, states = epoch_ids(small_corpus, world=2, workers=2, stop=5)
    assert states[0] == states[1]  # the cursor is global
    rest, _ = epoch_ids(small_corpus, world=3, workers=0, state=states[0])
    a = np.concatenate([np.concatenate(b) for b in first])
    b = np.concatenate([np.concatenate(x) for x in rest])
    assert len(np.intersect1d(a, b)) == 0
    n = json.loads((small_corpus / "manifest.json").read_text())["n_cells"]
    assert n - len(a) - len(b) < 3


def test_epochs_differ_and_persistent_workers_follow(small_corpus):
    L = StreamingLoader(small_corpus, batch_size=64, seed=0, rank=0, world_size=1, num_workers=2,
                        persistent_workers=True, block_size=128, window_batches=4)
    e0 = np.concatenate([b["cell_id"].numpy() for b in L])
    e1 = np.concatenate([b["cell_id"].numpy() for b in L])
    assert L.epoch == 2 and not np.array_equal(e0, e1)
    assert len(set(e0.tolist()) ^ set(e1.tolist())) < 2 * 2  # only the tail's few skipped cells differ
    L2 = StreamingLoader(small_corpus, batch_size=64, seed=0, rank=0, world_size=1, num_workers=2,
                         block_size=128, window_batches=4)
    L2.set_epoch(1)  # fresh workers started at epoch 1 stream what persistent workers did
    assert np.array_equal(np.concatenate([b["cell_id"].numpy() for b in L2]), e1)


def test_trace_cli_stop_save_and_continue_elsewhere(tmp_path, small_corpus):
    base = ["-m", "data_loader", "trace", "--corpus", str(small_corpus), "--batch-size", "40", "--seed", "3"]
    run_cli([*base, "--world-size", "2", "--workers", "1", "--stop-after", "6", "--state-out", str(tmp_path / "s.json"),
             "--out", str(tmp_path / "a.jsonl")])
    run_cli([*base, "--world-size", "3", "--state-in", str(tmp_path / "s.json"), "--out", str(tmp_path / "b.jsonl")])
    rows = [json.loads(x) for f in ("a.jsonl", "b.jsonl") for x in (tmp_path / f).read_text().splitlines()]
    ids = [c for r in rows for c in r["cell_ids"]]
    n = json.loads((small_corpus / "manifest.json").read_text())["n_cells"]
    assert len(ids) == len(set(ids)) and n - len(ids) < 3
    assert {r["rank"] for r in rows} == {0, 1, 2} and all(r["datasets"] for r in rows)


@pytest.mark.parametrize("backend", ["zarr", "soma"])
def test_held_out_cells_are_never_streamed_for_training(tmp_path, backend):
    out = tmp_path / "ho"
    run_cli(["-m", "sharding", "build", "--source", "synthetic://cells=2000,genes=200,types=4,datasets=3,seed=1",
             "--out", str(out), "--holdout", "dataset_id=synthetic_2", "--cells-per-shard", "700", "--format", "both"])
    man = json.loads((out / "manifest.json").read_text())
    got = {}
    for split in ("train", "holdout"):
        L = StreamingLoader(out, backend=backend, batch_size=50, seed=0, rank=0, world_size=1,
                            obs_columns=["dataset_id"], split=split)
        ids, ds = [], set()
        for b in L:
            ids += b["cell_id"].tolist()
            ds |= set(b["obs"]["dataset_id"])
        got[split] = (ids, ds)
    assert got["holdout"][1] == {"synthetic_2"} and "synthetic_2" not in got["train"][1]
    assert len(got["holdout"][0]) == man["splits"]["holdout"]["n_cells"]
    assert len(set(got["train"][0]) | set(got["holdout"][0])) == man["n_cells"]


def test_soma_with_worker_processes_streams_and_early_exit_is_clean(small_corpus, tmp_path):
    """TileDB + forked workers deadlock: SOMA workers are spawned. Breaking out mid-epoch must
    leave no reader thread behind (the process exits 0)."""
    code = (
        "from data_loader import StreamingLoader\n"
        f"L = StreamingLoader({str(small_corpus)!r}, backend='soma', batch_size=64, seed=0, rank=0, world_size=1,"
        " num_workers=2, block_size=128, window_batches=4)\n"
        "n = sum(b['cell_id'].numel() for b in L)\n"
        f"M = StreamingLoader({str(small_corpus)!r}, backend='soma', batch_size=64, seed=0, rank=0, world_size=1)\n"
        "for i, b in enumerate(M):\n"
        "    if i == 2: break\n"
        "print('cells', n)\n"
    )
    p = run_cli(["-c", code], timeout=240)
    assert "cells 2999" in p.stdout or "cells 2998" in p.stdout


def _truth(corpus):
    man = json.loads((corpus / "manifest.json").read_text())
    truth = {}
    for s in man["zarr"]["shards"]:
        a = ad.read_zarr(corpus / s["path"])
        x = a.X.tocsr()
        for i, cid in enumerate(a.obs["cell_id"].to_numpy()):
            lo, hi = x.indptr[i], x.indptr[i + 1]
            truth[int(cid)] = (x.indices[lo:hi].astype(np.int64), x.data[lo:hi].astype(np.float64))
    return truth


def _check_batch(batch, truth):
    ptr = batch["indptr"].numpy()
    idx, dat = batch["indices"].numpy(), batch["data"].numpy()
    for i, cid in enumerate(batch["cell_id"].tolist()):
        t_idx, t_dat = truth[cid]
        o = np.argsort(idx[ptr[i]:ptr[i + 1]], kind="stable")
        np.testing.assert_array_equal(idx[ptr[i]:ptr[i + 1]][o], np.sort(t_idx))
        np.testing.assert_array_equal(dat[ptr[i]:ptr[i + 1]][o].astype(np.float64), t_dat[np.argsort(t_idx)])


@pytest.mark.parametrize("backend", ["zarr", "soma"])
def test_batches_kept_by_the_consumer_are_never_overwritten(small_corpus, backend):
    """The loader reuses its window buffers only when no batch, tensor or view of them is alive:
    batches held across two whole epochs still hold their own cells' counts."""
    truth = _truth(small_corpus)
    L = StreamingLoader(small_corpus, backend=backend, batch_size=64, seed=5, rank=0, world_size=1,
                        window_batches=4)
    kept = [b for _ in range(2) for b in L]
    views = [b["indices"][:3].numpy() for b in kept[:5]]  # views of views keep the buffer too
    for b in kept:
        _check_batch(b, truth)
    assert kept[0]["indices"].dtype == torch.uint16  # 300 genes
    assert kept[0]["data"].dtype == torch.uint16  # the SOMA backend too: the manifest says the counts fit
    assert all(len(v) == 3 for v in views)


def test_store_dtypes_follow_the_data(tmp_path):
    """uint16 counts and indices by default; a count above 65,535 makes the corpus float32 (every batch);
    --x-dtype float32 keeps the classic int32/float32."""
    import anndata
    import scipy.sparse as sp

    x = sp.random(300, 50, density=0.2, format="csr", random_state=0, dtype=np.float32)
    x.data[:] = np.random.default_rng(0).integers(1, 30, x.nnz)
    x.data[7] = 70_000  # one deep gene in one cell
    a = anndata.AnnData(X=x)
    a.var_names = [f"G{j}" for j in range(50)]
    a.obs_names = [f"c{i}" for i in range(300)]
    a.write_h5ad(tmp_path / "deep.h5ad")
    dtypes = {}
    for opt in ("auto", "float32"):
        out = tmp_path / opt
        run_cli(["-m", "sharding", "build", "--source", str(tmp_path / "deep.h5ad"), "--out", str(out),
                 "--cells-per-shard", "100", "--x-dtype", opt])
        man = json.loads((out / "manifest.json").read_text())
        dtypes[opt] = man["zarr"]["dtypes"]
        shard_types = {str(ad.read_zarr(out / s["path"]).X.dtype) for s in man["zarr"]["shards"]}
        b = next(iter(StreamingLoader(out, batch_size=300, seed=0, rank=0, world_size=1)))
        assert str(b["data"].dtype) == f"torch.{man['zarr']['dtypes']['data']}"
        assert float(b["data"].max()) == 70_000.0
        if opt == "auto":  # the deep cell's shard is float32, the others uint16; batches are float32
            assert shard_types == {"uint16", "float32"}
    assert dtypes == {"auto": {"indices": "uint16", "data": "float32"},
                      "float32": {"indices": "int32", "data": "float32"}}


def test_block_size_travels_with_the_stream_state(small_corpus):
    L = StreamingLoader(small_corpus, batch_size=32, seed=0, rank=0, world_size=1, block_size=100)
    it = iter(L)
    head = [next(it)["cell_id"].numpy() for _ in range(3)]
    state = L.state_dict()
    del it
    assert state["block_size"] == 100
    R = StreamingLoader(small_corpus, batch_size=32, seed=0, rank=0, world_size=1)  # block size unset
    R.load_state_dict(state)
    assert R.block_size == 100
    rest = [b["cell_id"].numpy() for b in R]
    full = [b["cell_id"].numpy() for b in StreamingLoader(small_corpus, batch_size=32, seed=0, rank=0,
                                                          world_size=1, block_size=100)]
    assert all(np.array_equal(a, b) for a, b in zip(head + rest, full)) and len(head + rest) == len(full)
    other = StreamingLoader(small_corpus, batch_size=32, seed=0, rank=0, world_size=1, block_size=64)
    with pytest.raises(ValueError, match="saved with block_size=100.*block_size=100"):
        other.load_state_dict(state)


def test_a_state_saved_before_block_sizes_were_recorded_resumes_with_256(small_corpus):
    L = StreamingLoader(small_corpus, batch_size=32, seed=0, rank=0, world_size=1, block_size=256)
    it = iter(L)
    next(it)
    state = L.state_dict()
    del it
    state.pop("block_size")  # what earlier versions saved
    R = StreamingLoader(small_corpus, batch_size=32, seed=0, rank=0, world_size=1)
    R.load_state_dict(state)
    assert R.block_size == 256
    with pytest.raises(ValueError, match="MixedLoader"):
        R.load_state_dict({"mix": {}, "corpora": [state]})


def test_obs_columns_as_categorical_codes_and_as_plain_strings(tmp_path):
    """Low-cardinality text obs are stored as categoricals over the manifest's categories (read as codes);
    one with more than 4,096 values (barcodes) stays plain strings; both come back per cell, correctly."""
    import anndata
    import scipy.sparse as sp

    n = 5000
    x = sp.random(n, 40, density=0.2, format="csr", random_state=1, dtype=np.float32)
    x.data[:] = np.random.default_rng(1).integers(1, 9, x.nnz)
    x[np.flatnonzero(np.diff(x.indptr) == 0), 0] = 1  # no empty cells (they would be dropped)
    a = anndata.AnnData(X=sp.csr_matrix(x))
    a.var_names = [f"G{j}" for j in range(40)]
    a.obs_names = [f"cell{i}" for i in range(n)]
    a.obs["barcode"] = [f"BC{i:06d}" for i in range(n)]
    a.obs["cell_type"] = np.random.default_rng(2).choice(["T", "B", "NK"], n)
    a.write_h5ad(tmp_path / "bc.h5ad")
    out = tmp_path / "c"
    run_cli(["-m", "sharding", "build", "--source", str(tmp_path / "bc.h5ad"), "--out", str(out),
             "--keep-obs", "barcode", "--label-key", "cell_type", "--cells-per-shard", "2000"])
    man = json.loads((out / "manifest.json").read_text())
    assert "barcode" not in man["obs_categories"] and sorted(man["obs_categories"]["cell_type"]) == ["B", "NK", "T"]
    L = StreamingLoader(out, batch_size=500, seed=0, rank=0, world_size=1, obs_columns=["barcode", "cell_type"])
    got = {}
    for b in L:
        for cid, bc, ct in zip(b["cell_id"].tolist(), b["obs"]["barcode"], b["obs"]["cell_type"]):
            got[cid] = (bc, ct)
    assert len(got) >= n - 1
    for cid, (bc, ct) in got.items():  # cell_id = position in the source
        assert bc == f"BC{cid:06d}" and ct == a.obs["cell_type"].iloc[cid]


def test_named_constructors_and_both_readers_meet_the_reader_protocol(small_corpus):
    from scpretrain.data_loader.readers import Reader

    by_name = StreamingLoader.from_corpus(small_corpus, backend="soma", batch_size=64, seed=3, rank=0, world_size=1)
    plain = StreamingLoader(small_corpus, backend="soma", batch_size=64, seed=3, rank=0, world_size=1)
    store = StreamingLoader.from_soma(str(small_corpus / "soma"), batch_size=64, seed=3, rank=0, world_size=1)
    assert isinstance(by_name.reader, Reader) and isinstance(store.reader, Reader)
    assert isinstance(StreamingLoader.from_corpus(small_corpus, rank=0, world_size=1).reader, Reader)
    a, b = next(iter(by_name)), next(iter(plain))
    assert torch.equal(a["cell_id"], b["cell_id"]) and torch.equal(a["data"], b["data"])
    assert store.n_cells == plain.n_cells
