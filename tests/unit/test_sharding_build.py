"""Corpus build round trips on tiny real data: h5ad -> Zarr shards + SOMA -> the same counts."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tiledbsoma as soma

from scpretrain.sharding import build as build_mod
from scpretrain.sharding import manifest as mf
from scpretrain.sharding.build import BuildConfig, build
from scpretrain.sharding.check import summarize, verify
from scpretrain.sharding.errors import InputError


def _counts(rng: np.random.Generator, n: int, g: int, zero_rows: tuple[int, ...] = ()) -> sp.csr_matrix:
    dense = rng.poisson(0.6, size=(n, g)).astype(np.float32)
    dense[list(zero_rows)] = 0
    return sp.csr_matrix(dense)


def _source_a(tmp: Path) -> tuple[Path, sp.csr_matrix, list[str]]:
    """300 cells x 40 genes, versioned Ensembl var_names with symbols in feature_name; 3 empty cells."""
    rng = np.random.default_rng(1)
    x = _counts(rng, 300, 40, zero_rows=(5, 17, 299))
    ids = [f"ENSG{j:011d}.{j % 3 + 1}" for j in range(40)]
    var = pd.DataFrame({"feature_name": [f"GENE{j}" for j in range(40)]}, index=ids)
    obs = pd.DataFrame({"cell_type": rng.choice(["T", "B", "NK"], 300),
                        "donor": rng.choice(["d1", "d2"], 300)},
                       index=[f"a{i}" for i in range(300)])
    path = tmp / "a.h5ad"
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
    return path, x, [f"GENE{j}" for j in range(40)]


def _source_b(tmp: Path) -> tuple[Path, sp.csr_matrix, list[str]]:
    """200 cells; X normalized over 30 genes, raw.X = counts over 35 symbols (20 shared with A)."""
    rng = np.random.default_rng(2)
    symbols = [f"GENE{j}" for j in range(20, 40)] + [f"NEW{j}" for j in range(15)]
    raw_x = _counts(rng, 200, 35)
    obs = pd.DataFrame({"cell_type": rng.choice(["T", "Mono"], 200), "dataset_id": "b_set",
                        "donor": rng.choice(["d3"], 200)}, index=[f"b{i}" for i in range(200)])
    raw = ad.AnnData(X=raw_x, obs=obs, var=pd.DataFrame(index=symbols))
    norm = raw[:, :30].copy()
    norm.X = sp.csr_matrix(np.log1p(norm.X.toarray() / 3.0).astype(np.float32))
    norm.raw = raw
    path = tmp / "b.h5ad"
    norm.write_h5ad(path)
    return path, raw_x, symbols


def _expected(sources: list[tuple[sp.csr_matrix, list[str]]], vocab_symbols: list[str]) -> np.ndarray:
    """Dense (cells x vocab) counts in cell_id order, dropping all-zero cells, mapped by symbol."""
    col = {s: j for j, s in enumerate(vocab_symbols)}
    rows = []
    for x, symbols in sources:
        dense = x.toarray()
        out = np.zeros((dense.shape[0], len(vocab_symbols)), dtype=np.float32)
        out[:, [col[s] for s in symbols]] = dense
        rows.append(out[dense.sum(axis=1) > 0])
    return np.vstack(rows)


def _zarr_counts(corpus: Path, manifest: dict) -> tuple[np.ndarray, list[np.ndarray]]:
    dense = np.zeros((manifest["n_cells"], manifest["n_genes"]), dtype=np.float32)
    ids_per_shard = []
    for shard in manifest["zarr"]["shards"]:
        a = ad.read_zarr(corpus / shard["path"])
        # integer counts <= 65,535 over < 65,536 genes: stored (and read back by anndata) as uint16
        assert sp.issparse(a.X) and a.X.dtype == np.uint16 and a.X.nnz == shard["nnz"]
        assert manifest["zarr"]["dtypes"] == {"indices": "uint16", "data": "uint16"}
        ids = a.obs["cell_id"].to_numpy()
        assert a.obs.index.tolist() == [str(i) for i in ids]
        dense[ids] = a.X.toarray()
        ids_per_shard.append(ids)
    return dense, ids_per_shard


def test_round_trip_h5ad_to_zarr_and_soma(tmp_path: Path) -> None:
    a, xa, sym_a = _source_a(tmp_path)
    b, xb, sym_b = _source_b(tmp_path)
    out = tmp_path / "corpus"
    lines: list[str] = []
    m = build(BuildConfig(sources=[str(a), str(b)], out=out, format="both", cells_per_shard=128,
                          keep_obs=["donor"], holdout="cell_type=Mono", progress=False), log=lines.append)
    log = "\n".join(lines)
    assert "counts from raw.X" in log and "counts from X" in log

    genes = mf.read_vocab(out)
    assert [g for g, _ in genes[:3]] == ["ENSG00000000000", "ENSG00000000001", "ENSG00000000002"]
    assert len(genes) == 55 and m["n_genes"] == 55  # 40 from a, 15 new symbols from b
    assert m["vocab"]["sha256"] == mf.vocab_sha256([g for g, _ in genes])
    vocab_symbols = [s for _, s in genes]
    expected = _expected([(xa, sym_a), (xb, sym_b)], vocab_symbols)
    assert m["n_cells"] == 497 and m["nnz"] == int(np.count_nonzero(expected))

    dense, ids_per_shard = _zarr_counts(out, m)
    np.testing.assert_array_equal(dense, expected)
    assert len(ids_per_shard) == 4 and sorted(np.concatenate(ids_per_shard).tolist()) == list(range(497))
    for ids in ids_per_shard:  # pre-shuffled: each shard mixes both sources, in no particular order
        assert (ids < 297).any() and (ids >= 297).any() and not np.all(np.diff(ids) > 0)

    with soma.Experiment.open(str(out / "soma")) as exp:
        obs = exp.obs.read().concat().to_pandas()
        tbl = exp.ms["RNA"].X["raw"].read().tables().concat()
        var = exp.ms["RNA"].var.read().concat().to_pandas()
    ij = (tbl["soma_dim_0"].to_numpy(), tbl["soma_dim_1"].to_numpy())
    coo = sp.coo_matrix((tbl["soma_data"].to_numpy(), ij), shape=(497, 55)).toarray()
    order = obs.sort_values("soma_joinid")["cell_id"].to_numpy()
    np.testing.assert_array_equal(coo, expected[order])
    np.testing.assert_array_equal(order, np.concatenate(ids_per_shard))  # same shuffled order as the shards
    assert var["gene_id"].tolist() == [g for g, _ in genes]

    assert m["obs_columns"] == ["cell_id", "dataset_id", "cell_type", "source", "split", "donor"]
    assert m["datasets"] == {"a": 297, "b_set": 200}
    assert m["splits"]["holdout"]["n_cells"] == int((obs["cell_type"] == "Mono").sum())
    assert set(obs.loc[obs["split"] == "holdout", "cell_type"]) == {"Mono"}
    src_a, src_b = m["sources"]
    assert src_a["n_dropped_min_genes"] == 3 and src_a["n_cells_kept"] == 297 and src_b["matrix"] == "raw.X"
    assert src_a["sha256"] == mf.file_sha256(a) and src_b["gene_coverage"] == 1.0
    assert not (out / ".build").exists() and verify(out) == []
    assert "cells 497" in summarize(out)


def test_synthetic_build_is_deterministic_and_balanced(tmp_path: Path) -> None:
    cfg = dict(sources=["synthetic://cells=1000,genes=60,types=4,datasets=2,density=0.3"],
               cells_per_shard=300, progress=False)
    m1 = build(BuildConfig(out=tmp_path / "c1", **cfg), log=lambda s: None)
    m2 = build(BuildConfig(out=tmp_path / "c2", **cfg), log=lambda s: None)
    assert [s["n_cells"] for s in m1["zarr"]["shards"]] == [250, 250, 250, 250]  # capacities, no drops here
    assert [s["sha256"] for s in m1["zarr"]["shards"]] == [s["sha256"] for s in m2["zarr"]["shards"]]
    m3 = build(BuildConfig(out=tmp_path / "c3", **{**cfg, "seed": 1}), log=lambda s: None)
    assert [s["sha256"] for s in m1["zarr"]["shards"]] != [s["sha256"] for s in m3["zarr"]["shards"]]
    assert m1["soma"] is None and m1["format_version"] == 1


@pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3")
def test_synthetic_uses_vocab_gene_ids(tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.tsv"
    mf.write_vocab(vocab, [(f"ENSG{j:011d}", f"SYM{j}") for j in range(80)])
    m = build(BuildConfig(sources=["synthetic://cells=100,genes=50"], out=tmp_path / "c", vocab=vocab,
                          codec="lz4", progress=False), log=lambda s: None)
    assert m["n_genes"] == 80 and m["sources"][0]["vocab_coverage"] == pytest.approx(50 / 80)
    a = ad.read_zarr(tmp_path / "c" / m["zarr"]["shards"][0]["path"])
    assert a.var_names[0] == "ENSG00000000000" and a.X[:, 50:].nnz == 0 and a.X.nnz > 0


def _shard_arrays(corpus: Path) -> Path:
    return corpus / "zarr" / "shard-00001.zarr" / "X" / "data" / "c"


def test_verify_detects_deleted_and_corrupted_chunks(tmp_path: Path) -> None:
    out = tmp_path / "c"
    build(BuildConfig(sources=["synthetic://cells=2000,genes=200"], out=out, cells_per_shard=1000,
                      progress=False), log=lambda s: None)
    assert verify(out) == []
    chunk = _shard_arrays(out) / "0"
    original = chunk.read_bytes()
    chunk.write_bytes(original[:-7] + b"garbage")
    problems = verify(out)
    assert problems and all(p.startswith("zarr/shard-00001.zarr:") for p in problems)
    assert any("checksum" in p for p in problems)
    chunk.unlink()
    problems = verify(out)
    assert any("X/data is missing 1 of" in p for p in problems)
    chunk.write_bytes(original)
    assert verify(out) == []


def test_resume_after_crash_keeps_finished_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "c"
    cfg = BuildConfig(sources=["synthetic://cells=1500,genes=80,density=0.3"], out=out, cells_per_shard=500,
                      format="both", progress=False)
    real_write, calls = build_mod.zarr_store.write_shard, []

    def crash_on_third(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(build_mod.zarr_store, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build(cfg, log=lambda s: None)
    assert not (out / "manifest.json").exists() and (out / ".build" / "p1-00000.json").exists()  # phase 1 done
    finished = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((out / "zarr").glob("*.zarr"))}
    assert len(finished) == 2

    monkeypatch.setattr(build_mod.zarr_store, "write_shard", real_write)
    lines: list[str] = []
    m = build(cfg, log=lines.append)
    assert any("resuming" in line for line in lines)
    for p, stamp in finished.items():
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp  # not rewritten
    assert verify(out) == [] and m["n_cells"] == 1500

    fresh = build(BuildConfig(**{**cfg.__dict__, "out": tmp_path / "fresh"}), log=lambda s: None)
    assert [s["sha256"] for s in fresh["zarr"]["shards"]] == [s["sha256"] for s in m["zarr"]["shards"]]


def test_existing_corpus_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "c"
    cfg = BuildConfig(sources=["synthetic://cells=50,genes=20,density=0.5"], out=out, progress=False)
    build(cfg, log=lambda s: None)
    with pytest.raises(InputError, match="already holds a complete corpus"):
        build(cfg, log=lambda s: None)
    build(BuildConfig(**{**cfg.__dict__, "overwrite": True}), log=lambda s: None)
    assert json.loads((out / "manifest.json").read_text())["n_cells"] == 50


def test_soma_only_with_holdout_on_a_source_column(tmp_path: Path) -> None:
    out = tmp_path / "c"
    m = build(BuildConfig(sources=["synthetic://cells=400,genes=50,datasets=2,density=0.3"], out=out,
                          format="soma", cells_per_shard=150, holdout="donor_id=synthetic_1_donor_0",
                          progress=False), log=lambda s: None)
    assert m["zarr"] is None and not (out / "zarr").exists() and verify(out) == []
    with soma.Experiment.open(str(out / "soma")) as exp:
        obs = exp.obs.read().concat().to_pandas()
    assert "donor_id" not in obs.columns  # used for the split, not kept
    assert sorted(obs["soma_joinid"]) == list(range(400)) and sorted(obs["cell_id"]) == list(range(400))
    assert m["splits"]["holdout"] == {"by": "donor_id", "values": ["synthetic_1_donor_0"],
                                      "n_cells": int((obs["split"] == "holdout").sum())}
    assert 0 < m["splits"]["holdout"]["n_cells"] < 200


@pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3")
@pytest.mark.parametrize("codec", ["zstd", "lz4", "blosc-zstd"])
def test_hand_written_chunks_are_the_bytes_zarr_writes(tmp_path: Path, codec: str) -> None:
    import zarr

    from scpretrain.sharding import zarr_store

    rng = np.random.default_rng(0)
    csr = sp.random(300, 500, density=0.3, format="csr", random_state=1, dtype=np.float32)
    csr.data[:] = rng.integers(1, 9, csr.nnz)
    obs = pd.DataFrame({"cell_id": np.arange(300)}, index=[str(i) for i in range(300)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(500)])
    ours = tmp_path / "ours.zarr"
    zarr_store.write_shard(ours, csr, obs, var, codec=codec, chunk_nnz=4096)  # edge chunk is partial
    np.testing.assert_array_equal(ad.read_zarr(ours).X.toarray(), csr.toarray())
    for name in zarr_store.X_ARRAYS:
        values = zarr.open_array(ours / "X" / name, mode="r")[:]  # the dtypes write_shard chose
        chunks = values.size if name == "indptr" else 4096
        ref = zarr.create_array(tmp_path / "ref" / name, shape=values.shape, dtype=values.dtype,
                                chunks=(chunks,), compressors=[zarr_store.make_codec(codec)],
                                config={"write_empty_chunks": True})
        ref[:] = values
        mine = sorted(p.name for p in (ours / "X" / name / "c").iterdir())
        assert mine == sorted(p.name for p in (tmp_path / "ref" / name / "c").iterdir())
        for key in mine:
            ref_bytes = (tmp_path / "ref" / name / "c" / key).read_bytes()
            assert (ours / "X" / name / "c" / key).read_bytes() == ref_bytes


def test_parallel_build_writes_the_same_corpus(tmp_path: Path) -> None:
    """--jobs 2: phase 1 as two tasks in spawned processes (blocks of 256 rows: 3 + 2 blocks), shards written
    by two workers, one SOMA experiment: the corpus of --jobs 1."""
    from scpretrain.sharding.build import pass2_jobs

    cfg = dict(sources=["synthetic://cells=1200,genes=60,density=0.3"], cells_per_shard=300, format="both",
               progress=False, block_rows=256)
    serial = build(BuildConfig(out=tmp_path / "serial", jobs=1, **cfg), log=lambda s: None)
    parallel = build(BuildConfig(out=tmp_path / "parallel", jobs=2, **cfg), log=lambda s: None)
    checksums = [s["sha256"] for s in serial["zarr"]["shards"]]
    assert checksums == [s["sha256"] for s in parallel["zarr"]["shards"]]
    assert serial["labels"] == parallel["labels"] and verify(tmp_path / "parallel") == []
    with soma.Experiment.open(str(tmp_path / "parallel" / "soma")) as exp:
        obs = exp.obs.read().concat().to_pandas().sort_values("soma_joinid")
    with soma.Experiment.open(str(tmp_path / "serial" / "soma")) as exp:
        ref = exp.obs.read().concat().to_pandas().sort_values("soma_joinid")
    assert obs["cell_id"].tolist() == ref["cell_id"].tolist()
    assert pass2_jobs(0, 50_000, 10) == 1 and pass2_jobs(3, 50_000, 2) == 2 and pass2_jobs(0, 10**6, 1) == 1


def test_soma_x_has_one_gene_tile_and_reads_back_the_csr(tmp_path: Path) -> None:
    """One tile across all genes makes TileDB's global order CSR order: rows are written unsorted by TileDB
    (sort_coords off), so a wrong order would fail the write or the read-back below."""
    import json as _json

    import tiledbsoma as soma

    from scpretrain.sharding import soma_store

    x = sp.random(500, 450, density=0.05, format="csr", random_state=2, dtype=np.float32)
    x.data[:] = np.arange(1, x.nnz + 1)
    x = x[:, np.random.default_rng(0).permutation(450)].tocsr()  # unsorted column indices
    x.has_sorted_indices = False
    uri = tmp_path / "soma"
    genes = [(f"g{j}", f"s{j}") for j in range(450)]
    soma_store.create_experiment(uri, n_cells=800, genes=genes, obs_columns=["cell_id"])
    obs = pd.DataFrame({"cell_id": np.arange(300, 800)})
    soma_store.write_rows(uri, 300, x, obs, replace=False)
    with soma.SparseNDArray.open(str(uri / "ms" / "RNA" / "X" / "raw")) as arr:
        dims = _json.loads(arr.schema_config_options().dims)
        assert dims["soma_dim_1"]["tile"] == "450" and dims["soma_dim_0"]["tile"] == str(soma_store.X_ROW_TILE)
        tbl = arr.read(coords=(slice(300, 799),)).tables().concat()
    got = sp.coo_matrix((tbl["soma_data"].to_numpy(), (tbl["soma_dim_0"].to_numpy() - 300,
                                                       tbl["soma_dim_1"].to_numpy())), shape=(500, 450)).tocsr()
    assert (got != x).nnz == 0


def test_holdout_a_fraction_of_donors(tmp_path: Path) -> None:
    from scpretrain.sharding.validate import parse_holdout

    cfg = dict(sources=["synthetic://cells=3000,genes=40,datasets=6,density=0.3"], cells_per_shard=1000,
               holdout="donor_id:0.3", keep_obs=["donor_id"], progress=False)
    m = build(BuildConfig(out=tmp_path / "c", **cfg), log=lambda s: None)
    obs = pd.concat(ad.read_zarr(tmp_path / "c" / s["path"]).obs for s in m["zarr"]["shards"])
    by_donor = obs.groupby("donor_id")["split"].agg(set)
    assert all(len(sides) == 1 for sides in by_donor)  # every donor wholly on one side
    held = sorted(d for d, sides in by_donor.items() if sides == {"holdout"})
    assert 0 < len(held) < len(by_donor)
    assert m["splits"]["holdout"] == {"by": "donor_id", "fraction": 0.3, "values": held,
                                      "n_cells": int((obs["split"] == "holdout").sum())}
    again = build(BuildConfig(out=tmp_path / "again", **cfg), log=lambda s: None)
    assert again["splits"] == m["splits"]
    assert "30% of donor_id values by hash" in summarize(tmp_path / "c")
    for bad in ("donor_id:1.5", "donor_id:x", ":0.1"):
        with pytest.raises(InputError, match="expected COL:FRACTION with 0 < FRACTION < 1"):
            parse_holdout(bad)
    assert parse_holdout("dataset_id=a,b").values == ("a", "b")


def test_read_ahead_keeps_order_passes_errors_and_stops() -> None:
    import threading

    from scpretrain.sharding.readahead import read_ahead

    assert list(read_ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise InputError("bad block")

    got = []
    with pytest.raises(InputError, match="bad block"):
        for x in read_ahead(failing(), depth=2):
            got.append(x)
    assert got == [1]
    produced = []

    def endless():
        for i in range(10**9):
            produced.append(i)
            yield i

    gen = read_ahead(endless(), depth=2)
    assert next(gen) == 0
    gen.close()  # the consumer stops: the thread must stop too, a few items ahead at most
    assert not any(t.name == "sharding-read-ahead" for t in threading.enumerate())
    assert len(produced) <= 5
