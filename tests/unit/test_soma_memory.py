"""The SOMA reader's memory plan (data.soma_memory_budget): bounded TileDB buffers, queries streamed table by
table into one window held in read order, results that arrive out of row order (several fragments) put right."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import tiledbsoma as soma

from scpretrain.data_loader import StreamingLoader, readers, soma_reader
from scpretrain.data_loader.readers import Block, slice_rows, take_rows
from scpretrain.data_loader.soma_reader import MIB, SomaReader
from scpretrain.sharding.build import BuildConfig, build


def fragmented_experiment(uri: Path, n: int = 3000, g: int = 400, pieces: int = 6, seed: int = 0) -> np.ndarray:
    """An experiment whose X was written in ``pieces`` fragments, each holding every ``pieces``-th gene of all
    cells (last one first): TileDB's unordered reads then return a row's genes fragment by fragment, rows out
    of order. Returns the dense counts."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, g)) < 0.15) * rng.integers(1, 50, size=(n, g))
    x = x.astype(np.float32)
    exp = soma.Experiment.create(str(uri))
    obs = pa.table({"soma_joinid": np.arange(n, dtype=np.int64), "cell_id": np.arange(n, dtype=np.int64) + 10_000})
    with exp.add_new_dataframe("obs", schema=obs.schema, index_column_names=["soma_joinid"],
                               domain=[(0, n - 1)]) as df:
        df.write(obs)
    rna = exp.add_new_collection("ms").add_new_collection("RNA", soma.Measurement)
    with rna.add_new_collection("X").add_new_sparse_ndarray("raw", type=pa.float32(), shape=(n, g)) as arr:
        coo = sp.coo_matrix(x)
        for k in reversed(range(pieces)):
            keep = coo.col % pieces == k
            arr.write(pa.table({"soma_dim_0": coo.row[keep].astype(np.int64),
                                "soma_dim_1": coo.col[keep].astype(np.int64), "soma_data": coo.data[keep]}))
    exp.close()
    return x


def dense(block, g: int) -> np.ndarray:
    out = np.zeros((len(block), g), np.float32)
    for i in range(len(block)):
        a, b = block.indptr[i], block.indptr[i + 1]
        out[i, block.indices[a:b].astype(np.int64)] = block.data[a:b]
    return out


def test_rows_out_of_order_across_fragments_come_back_right(tmp_path, monkeypatch):
    """TileDB's unordered results may come out of row order (several fragments); here the real results of each
    query are cut into pieces handed over last piece first, so the reader must put them in order."""
    x = fragmented_experiment(tmp_path / "exp")
    real = SomaReader._tables
    reordered = []

    def scrambled(self, X, jids):
        held: list = []
        for a, q, t in real(self, X, jids):
            if t is not None:
                held += [t.slice(o, 5000) for o in range(0, t.num_rows, 5000)]
                continue
            reordered.append(len(held))
            for piece in reversed(held):
                yield a, q, piece
            held = []
            yield a, q, None

    monkeypatch.setattr(SomaReader, "_tables", scrambled)
    r = SomaReader(str(tmp_path / "exp"), [], memory_budget_mb=64)
    r.nnz_per_row = 60.0  # 2^25 / 60 -> 65,536-row queries: every query spans all six fragments
    rows = np.sort(np.random.default_rng(1).choice(3000, 1200, replace=False))
    order = np.random.default_rng(2).permutation(1200)
    block = r.read_window(np.zeros(1200, np.int64), rows, order)
    assert block.order is not None  # held in read order, gathered batch by batch
    got = dense(slice_rows(block, 0, 1200), 400)
    want = x[rows[order]]
    assert np.array_equal(got, want)
    assert np.array_equal(slice_rows(block, 100, 164).cell_id, rows[order][100:164] + 10_000)
    assert reordered and max(reordered) > 1  # the queries really came in several pieces, out of order


def test_the_budget_sets_tiledb_buffers_query_size_and_windows_in_flight(tmp_path):
    fragmented_experiment(tmp_path / "exp", n=600, g=100, pieces=2)
    small = SomaReader(str(tmp_path / "exp"), [], memory_budget_mb=64)
    big = SomaReader(str(tmp_path / "exp"), [], memory_budget_mb=4096)
    assert small.tiledb_config() == {"soma.init_buffer_bytes": 2 * MIB, "sm.mem.total_budget": 8 * MIB}
    assert big.tiledb_config()["soma.init_buffer_bytes"] == 32 * MIB
    small.nnz_per_row = big.nnz_per_row = 1500.0
    assert small.rows_per_read == big.rows_per_read == 16384
    # a 32,768-cell window of ~1,500 non-zeros is 295 MB: none ahead at 64 MiB, several at 4 GiB
    assert small.window_limit(32768) == 1 and big.window_limit(32768) == 7
    # uint16 counts (our corpus's, when its manifest says they fit): 4 bytes a non-zero instead of 6
    narrow = SomaReader(str(tmp_path / "exp"), [], memory_budget_mb=4096, counts_dtype=np.uint16)
    narrow.nnz_per_row = 1500.0
    assert narrow.window_bytes_per_nnz == 4 and narrow.window_limit(32768) == 10
    with pytest.raises(ValueError, match="data.soma_memory_budget: 32 MiB is below the 64 MiB"):
        SomaReader(str(tmp_path / "exp"), [], memory_budget_mb=32)


@pytest.mark.parametrize("budget", [64, 2048])
def test_exactly_once_and_resume_under_any_budget(tmp_path, budget):
    x = fragmented_experiment(tmp_path / "exp", n=2000, g=200, pieces=4)

    def loader():
        return StreamingLoader.from_soma(str(tmp_path / "exp"), batch_size=100, seed=3, rank=0, world_size=1,
                                         window_batches=4, soma_memory_budget=budget, pin_memory=False)

    ld = loader()
    seen, first = [], []
    for i, b in enumerate(ld):
        ids = b["cell_id"].numpy()
        got = np.zeros((len(ids), 200), np.float32)
        ptr, idx, dat = b["indptr"].numpy(), b["indices"].numpy().astype(np.int64), b["data"].numpy()
        for k in range(len(ids)):
            got[k, idx[ptr[k]:ptr[k + 1]]] = dat[ptr[k]:ptr[k + 1]]
        assert np.array_equal(got, x[ids - 10_000])  # the store's cell_id names the cell
        seen.extend(ids.tolist())
        if i == 6:
            state = ld.state_dict()
            first = list(seen)
    assert sorted(seen) == list(range(10_000, 12_000))
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [c for b in resumed for c in b["cell_id"].numpy().tolist()]
    assert first + rest == seen


def batches(loader) -> list:
    return [(b["cell_id"].numpy(), b["indptr"].numpy(), b["indices"].numpy(), b["data"].numpy()) for b in loader]


@pytest.mark.parametrize("x_dtype", ["auto", "float32"])
def test_soma_batches_equal_the_zarr_batches_dtype_included(tmp_path, x_dtype):
    """The SOMA backend of a corpus hands out what its Zarr backend does, value for value and dtype for dtype:
    uint16 counts where the build found they fit (half the window's bytes), float32 where it did not."""
    out = tmp_path / "c"
    m = build(BuildConfig(sources=["synthetic://cells=1500,genes=120,datasets=2,density=0.2"], out=out,
                          format="both", cells_per_shard=500, x_dtype=x_dtype, progress=False), log=lambda s: None)
    want = "uint16" if x_dtype == "auto" else "float32"
    assert m["zarr"]["dtypes"]["data"] == m["soma"]["dtypes"]["data"] == want

    def run(backend):
        return batches(StreamingLoader(out, backend=backend, batch_size=100, seed=5, rank=0, world_size=1,
                                       block_size=64, window_batches=4, pin_memory=False))

    z, s = run("zarr"), run("soma")
    assert len(z) == len(s) == 15
    for bz, bs in zip(z, s):
        for a, b in zip(bz, bs):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert s[0][3].dtype == np.dtype(want)


def test_a_soma_only_build_records_whether_its_counts_fit_uint16(tmp_path):
    wide = tmp_path / "wide.h5ad"
    x = sp.random(300, 40, density=0.3, format="csr", random_state=0, dtype=np.float32)
    x.data = np.ceil(x.data * 20)
    x[7, 3] = 70_000.0  # one count past uint16: the SOMA batches stay float32 and keep it exact
    import anndata as ad
    import pandas as pd

    ad.AnnData(x, obs=pd.DataFrame(index=[f"c{i}" for i in range(300)]),
               var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(40)])).write_h5ad(wide)
    for src, want in ((str(wide), "float32"), ("synthetic://cells=300,genes=40,density=0.3", "uint16")):
        out = tmp_path / want
        m = build(BuildConfig(sources=[src], out=out, format="soma", cells_per_shard=100, progress=False),
                  log=lambda s: None)
        assert m["zarr"] is None and m["soma"]["dtypes"] == {"indices": "uint16", "data": want}
        got = batches(StreamingLoader(out, backend="soma", batch_size=50, seed=0, rank=0, world_size=1,
                                      pin_memory=False))
        data = np.concatenate([b[3] for b in got])
        assert data.dtype == np.dtype(want) and len(np.concatenate([b[0] for b in got])) == 300
        if want == "float32":
            assert data.max() == 70_000.0


def test_copy_into_the_window_matches_numpy_and_refuses_rows_out_of_order():
    rng = np.random.default_rng(0)
    q = np.sort(rng.choice(5000, 300, replace=False)).astype(np.int64)
    per = rng.integers(0, 9, size=len(q))
    dim0 = np.repeat(q, per)
    dim1 = rng.integers(0, 60000, size=len(dim0)).astype(np.int64)
    val = rng.integers(1, 65535, size=len(dim0)).astype(np.float32)
    for dtype in (np.uint16, np.float32):
        out_idx, out_dat = np.zeros(len(dim0) + 9, np.uint16), np.zeros(len(dim0) + 9, dtype)
        counts = np.zeros(len(q), np.int64)
        assert soma_reader._append_sorted(dim0, dim1, val, q, -1, out_idx, out_dat, 9, counts)
        assert np.array_equal(out_idx[9:], dim1) and np.array_equal(out_dat[9:], val.astype(dtype))
        assert np.array_equal(counts, per)
        swapped = dim0.copy()
        swapped[[5, 200]] = swapped[[200, 5]]
        untouched = np.zeros(3, np.uint16)
        assert not soma_reader._append_sorted(swapped, dim1, val, q, -1, out_idx, out_dat, 0, counts)
        assert not soma_reader._append_sorted(dim0, dim1, val, q, int(q[-1]), untouched, untouched, 0, counts)
        assert not untouched.any()


def test_two_thread_gather_equals_one(monkeypatch):
    rng = np.random.default_rng(1)
    csr = sp.random(2000, 300, density=0.1, format="csr", random_state=2, dtype=np.float32)
    block = Block(csr.indptr.astype(np.int64), csr.indices.astype(np.uint16), csr.data,
                  np.arange(2000, dtype=np.int64), {}, order=None)
    order = rng.permutation(2000)
    monkeypatch.setattr(readers, "GATHER_SPLIT_NNZ", 1000)  # this block's ~60k non-zeros are split
    one, two = take_rows(block, order), take_rows(block, order, threads=2)
    for a, b in ((one.indptr, two.indptr), (one.indices, two.indices), (one.data, two.data)):
        assert np.array_equal(a, b)
    assert np.array_equal(two.data, csr[order].toarray()[csr[order].toarray() != 0])


def test_malloc_arenas_are_capped_unless_turned_off(monkeypatch):
    monkeypatch.setenv("SCPRETRAIN_MALLOC_ARENAS", "0")
    assert soma_reader.cap_malloc_arenas() is False
    monkeypatch.setenv("SCPRETRAIN_MALLOC_ARENAS", "2")
    assert soma_reader.cap_malloc_arenas() is True  # Linux with glibc here


def _gather_in_child(block, order, want, conn):
    conn.send(bool(np.array_equal(take_rows(block, order, threads=2).data, want)))


def test_two_thread_gather_after_a_fork(monkeypatch):
    """The helper thread does not survive fork(): a forked process makes its own instead of waiting forever."""
    import multiprocessing as mp

    csr = sp.random(500, 200, density=0.1, format="csr", random_state=3, dtype=np.float32)
    block = Block(csr.indptr.astype(np.int64), csr.indices.astype(np.uint16), csr.data,
                  np.arange(500, dtype=np.int64), {}, order=None)
    order = np.random.default_rng(4).permutation(500)
    monkeypatch.setattr(readers, "GATHER_SPLIT_NNZ", 100)
    want = take_rows(block, order, threads=2).data  # the parent's helper exists now
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_gather_in_child, args=(block, order, want, child), daemon=True)
    p.start()
    try:
        assert parent.poll(60) and parent.recv() is True
    finally:
        p.kill()
        p.join(10)
