"""The SOMA reader's memory plan (data.soma_memory_budget): bounded TileDB buffers, queries streamed table by
table into one window held in read order, results that arrive out of row order (several fragments) put right."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import tiledbsoma as soma

from scpretrain.data_loader import StreamingLoader
from scpretrain.data_loader.readers import slice_rows
from scpretrain.data_loader.soma_reader import MIB, SomaReader


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
