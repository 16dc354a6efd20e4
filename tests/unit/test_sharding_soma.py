"""SOMA sources: an existing TileDB-SOMA experiment, and a local store with the Census layout read
through the real ``cellxgene_census`` client with an obs filter; counts round-trip exactly."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp
import tiledbsoma as soma
import tiledbsoma.io

from scpretrain.sharding import manifest as mf
from scpretrain.sharding.__main__ import main
from scpretrain.sharding.build import BuildConfig, build
from scpretrain.sharding.check import verify
from scpretrain.sharding.errors import InputError
from scpretrain.sharding.sources.soma import parse_spec

BUILD_DATE = "2025-01-30"


def make_census_store(root: Path, n_cells: int = 300, n_genes: int = 50, seed: int = 0) -> dict:
    """A local store with the Census layout: census_info/summary and census_data/{homo_sapiens,mus_musculus}.

    homo_sapiens holds n_cells cells over n_genes genes (Ensembl feature_id, feature_name symbols) with
    Census obs columns (some dictionary-encoded, as in the Census), measurement RNA, X layer raw.
    Returns the dense counts and the obs/var frames, in soma_joinid order.
    """
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.5, size=(n_cells, n_genes)).astype(np.float32)
    x[::37] = 0  # a few empty cells
    obs = pd.DataFrame({
        "soma_joinid": np.arange(n_cells, dtype=np.int64),
        "dataset_id": rng.choice(["ds-a", "ds-b", "ds-c"], n_cells),
        "assay": "10x 3' v3",
        "cell_type": rng.choice(["T cell", "B cell", "alveolar macrophage"], n_cells),
        "donor_id": rng.choice(["donor1", "donor2", "donor3", "donor4"], n_cells),
        "tissue_general": rng.choice(["lung", "blood", "liver"], n_cells),
        "is_primary_data": rng.random(n_cells) < 0.8,
    })
    var = pd.DataFrame({"soma_joinid": np.arange(n_genes, dtype=np.int64),
                        "feature_id": [f"ENSG{j:011d}" for j in range(n_genes)],
                        "feature_name": [f"GENE{j}" for j in range(n_genes)],
                        "feature_length": rng.integers(500, 5000, n_genes)})
    with soma.Collection.create(str(root)) as census:
        info = census.add_new_collection("census_info")
        summary = pa.table({"soma_joinid": pa.array([0, 1], pa.int64()),
                            "label": ["census_schema_version", "census_build_date"],
                            "value": ["2.1.0", BUILD_DATE]})
        with info.add_new_dataframe("summary", schema=summary.schema, index_column_names=["soma_joinid"],
                                    domain=[(0, 1)]) as df:
            df.write(summary)
        data = census.add_new_collection("census_data")
        _experiment(data, "homo_sapiens", obs, var, x)
        mouse_var = var.iloc[:5].assign(feature_id=[f"ENSMUSG{j:011d}" for j in range(5)])
        _experiment(data, "mus_musculus", obs.iloc[:10], mouse_var, x[:10, :5])
    return {"x": x, "obs": obs, "var": var}


def _experiment(data: soma.Collection, name: str, obs: pd.DataFrame, var: pd.DataFrame,
                x: np.ndarray) -> None:
    exp = data.add_new_collection(name, soma.Experiment)
    table = pa.Table.from_pandas(obs, preserve_index=False)
    for col in ("dataset_id", "assay", "cell_type"):  # the Census stores these as enumerations
        i = table.schema.get_field_index(col)
        enum = table[col].dictionary_encode().cast(pa.dictionary(pa.int32(), pa.large_string()))
        table = table.set_column(i, col, enum)
    # created, closed, then reopened to write: tiledbsoma 2.3.0 drops the enumeration values of a
    # dictionary column written through the handle add_new_dataframe returns
    exp.add_new_dataframe("obs", schema=table.schema, index_column_names=["soma_joinid"],
                          domain=[(0, len(obs) - 1)]).close()
    with soma.DataFrame.open(f"{exp.uri}/obs", "w") as df:
        df.write(table)
    rna = exp.add_new_collection("ms").add_new_collection("RNA", soma.Measurement)
    var_table = pa.Table.from_pandas(var, preserve_index=False)
    with rna.add_new_dataframe("var", schema=var_table.schema, index_column_names=["soma_joinid"],
                               domain=[(0, len(var) - 1)]) as df:
        df.write(var_table)
    coo = sp.coo_matrix(x)
    with rna.add_new_collection("X").add_new_sparse_ndarray("raw", type=pa.float32(), shape=x.shape) as arr:
        arr.write(pa.table({"soma_dim_0": coo.row.astype(np.int64), "soma_dim_1": coo.col.astype(np.int64),
                            "soma_data": coo.data}))


def _corpus(out: Path, m: dict) -> tuple[np.ndarray, pd.DataFrame]:
    """Dense counts and obs of a built corpus, in cell_id order (from its Zarr shards)."""
    dense = np.full((m["n_cells"], m["n_genes"]), -1, dtype=np.float32)
    frames = []
    for shard in m["zarr"]["shards"]:
        a = ad.read_zarr(out / shard["path"])
        dense[a.obs["cell_id"].to_numpy()] = a.X.toarray()
        frames.append(a.obs)
    return dense, pd.concat(frames).set_index("cell_id").sort_index()


@pytest.fixture(scope="module")
def census_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("census") / "census"
    return root, make_census_store(root)


def _primary_lung(truth: dict) -> np.ndarray:
    obs = truth["obs"]
    sel = (obs["tissue_general"] == "lung") & obs["is_primary_data"] & (truth["x"].sum(axis=1) > 0)
    return np.flatnonzero(sel.to_numpy())


def test_census_store_through_cellxgene_census_with_a_filter(tmp_path: Path, census_store) -> None:
    import cellxgene_census

    root, truth = census_store
    with cellxgene_census.open_soma(uri=str(root)) as census:  # the real client opens our layout
        assert census["census_data"]["homo_sapiens"].ms["RNA"].X["raw"].shape == (300, 50)
    out = tmp_path / "c"
    lines: list[str] = []
    m = build(BuildConfig(sources=["census:homo_sapiens"], out=out, census_uri=str(root),
                          census_version=BUILD_DATE,
                          census_filter="tissue_general == 'lung' and is_primary_data == True",
                          keep_obs=["donor_id", "tissue_general", "is_primary_data"], format="both",
                          cells_per_shard=40, block_rows=32, holdout="donor_id=donor2", progress=False),
              log=lines.append)
    rows = _primary_lung(truth)
    assert 20 < rows.size < 150 and m["n_cells"] == rows.size
    dense, obs = _corpus(out, m)
    np.testing.assert_array_equal(dense, truth["x"][rows])  # cell_id order = soma_joinid order
    src_obs = truth["obs"].iloc[rows]
    assert obs["cell_type"].tolist() == src_obs["cell_type"].tolist()
    assert obs["dataset_id"].tolist() == src_obs["dataset_id"].tolist()
    assert obs["donor_id"].tolist() == src_obs["donor_id"].tolist()
    assert set(obs["tissue_general"]) == {"lung"} and set(obs["is_primary_data"]) == {"True"}
    assert (obs["split"] == "holdout").tolist() == (src_obs["donor_id"] == "donor2").tolist()
    assert [g for g, _ in mf.read_vocab(out)] == truth["var"]["feature_id"].tolist()
    src = m["sources"][0]
    assert src["kind"] == "census" and src["matrix"] == "ms['RNA'].X['raw']"
    assert src["census_build_date"] == BUILD_DATE and src["organism"] == "homo_sapiens"
    assert src["filter"] == "tissue_general == 'lung' and is_primary_data == True"
    assert src["matched_by"] == "var_names (Ensembl, versions stripped) -> vocab gene_id"
    assert not any("is_primary_data, so cells" in line for line in lines)
    assert verify(out) == []


def test_journey_two_cli_form(tmp_path: Path, census_store, capsys: pytest.CaptureFixture) -> None:
    root, truth = census_store
    rng = np.random.default_rng(9)
    h5ad_x = rng.poisson(1.0, size=(25, 30)).astype(np.float32) + 1
    a = ad.AnnData(X=sp.csr_matrix(h5ad_x),
                   obs=pd.DataFrame({"cell_type": "T cell", "dataset_id": "collab1", "donor_id": "d9"},
                                    index=[f"c{i}" for i in range(25)]),
                   var=pd.DataFrame(index=[f"GENE{j}" for j in range(30)]))
    (tmp_path / "data").mkdir()
    a.write_h5ad(tmp_path / "data" / "collab1.h5ad")
    vocab = tmp_path / "vocab.tsv"
    mf.write_vocab(vocab, list(zip(truth["var"]["feature_id"], truth["var"]["feature_name"])))
    out = tmp_path / "lung"
    code = main(["build", "--source", str(tmp_path / "data" / "*.h5ad"), "--source", "census:homo_sapiens",
                 "--census-uri", str(root),
                 "--census-filter", "tissue_general == 'lung' and is_primary_data == True",
                 "--vocab", str(vocab), "--keep-obs", "cell_type,dataset_id,donor_id",
                 "--holdout", "dataset_id=ds-b", "--out", str(out), "--format", "both", "--no-progress"])
    assert code == 0
    m = mf.read_manifest(out)
    rows = _primary_lung(truth)
    assert m["n_cells"] == 25 + rows.size and m["obs_columns"][-1] == "donor_id"
    dense, obs = _corpus(out, m)
    expected_h5ad = np.zeros((25, 50), dtype=np.float32)
    expected_h5ad[:, :30] = h5ad_x
    np.testing.assert_array_equal(dense, np.vstack([expected_h5ad, truth["x"][rows]]))
    assert m["splits"]["holdout"]["n_cells"] == int((truth["obs"].iloc[rows]["dataset_id"] == "ds-b").sum())
    assert m["datasets"]["collab1"] == 25
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    n_selected = int(((truth["obs"]["tissue_general"] == "lung") & truth["obs"]["is_primary_data"]).sum())
    assert main(["inspect", str(out)]) == 0
    assert ("census:homo_sapiens where tissue_general == 'lung' and is_primary_data == True (Census build "
            f"{BUILD_DATE}): kept {rows.size} of {n_selected} cells") in capsys.readouterr().out


def test_existing_soma_experiment_with_options(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.poisson(0.7, size=(120, 40)).astype(np.float32)
    x[7] = 0
    obs = pd.DataFrame({"cell_type": rng.choice(["T", "B"], 120), "batch": rng.choice(["b1", "b2"], 120)},
                       index=[f"cell{i}" for i in range(120)])
    var = pd.DataFrame({"gene_symbols": [f"GENE{j}" for j in range(40)]},
                       index=[f"ENSG{j:011d}.2" for j in range(40)])
    adata = ad.AnnData(X=sp.csr_matrix(np.log1p(x)), obs=obs, var=var, layers={"counts": sp.csr_matrix(x)})
    uri = str(tmp_path / "atlas.soma")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiledbsoma.io.from_anndata(uri, adata, measurement_name="RNA")
    out = tmp_path / "c"
    m = build(BuildConfig(sources=[f"soma://{uri}?layer=counts&filter=cell_type == 'T'"], out=out,
                          block_rows=16, cells_per_shard=30, dataset_key="batch", progress=False),
              log=lambda s: None)
    keep = np.flatnonzero(((obs["cell_type"] == "T").to_numpy()) & (x.sum(axis=1) > 0))
    dense, got = _corpus(out, m)
    np.testing.assert_array_equal(dense, x[keep])
    assert got["dataset_id"].tolist() == obs["batch"].iloc[keep].tolist()
    assert [g for g, _ in mf.read_vocab(out)][:2] == ["ENSG00000000000", "ENSG00000000001"]
    assert m["sources"][0]["matrix"] == "ms['RNA'].X['counts']" and m["sources"][0]["kind"] == "soma"

    # the X layer holds log1p values: refused with the count, as for an h5ad
    def fails(spec: str) -> str:
        with pytest.raises(InputError) as err:
            build(BuildConfig(sources=[spec], out=tmp_path / "bad", progress=False), log=lambda s: None)
        assert not (tmp_path / "bad" / "manifest.json").exists() and "\n" not in str(err.value)
        return str(err.value)

    n_frac = int(np.count_nonzero(np.log1p(x) != np.round(np.log1p(x))))
    assert fails(f"soma://{uri}?layer=data") == (
        f"soma://{uri}?layer=data: ms['RNA'].X['data'] has {n_frac} non-integer values; counts must be "
        "whole numbers (pass --allow-non-integer if the input is normalized on purpose, or --matrix to pick "
        "the raw counts)")
    assert fails(f"soma://{uri}") == (
        f"soma://{uri}: no X layer 'raw' (has: counts, data); pass layer=NAME with one of those")
    assert fails(f"soma://{uri}?measurement=ATAC") == (
        f"soma://{uri}?measurement=ATAC: no measurement 'ATAC' (has: RNA); pass measurement=NAME with one "
        "of those")
    assert fails(f"soma://{uri}?layer=counts&filter=cell_type == 'NK'") == (
        f"soma://{uri}?layer=counts&filter=cell_type == 'NK': the obs filter \"cell_type == 'NK'\" selects "
        "no cells; check the filter's column names and values")
    assert fails(f"soma://{uri}?layer=counts&filter=tissue == 'lung'").startswith(
        f"soma://{uri}?layer=counts&filter=tissue == 'lung': the obs filter \"tissue == 'lung'\" is "
        "invalid (")
    assert fails(f"soma://{tmp_path / 'nope'}").startswith(
        f"soma://{tmp_path / 'nope'}: cannot open a TileDB-SOMA Experiment at {tmp_path / 'nope'} (")
    assert fails(f"soma://{uri}?layr=counts") == (
        f"soma://{uri}?layr=counts: unknown option 'layr=counts'; allowed: measurement, layer, filter "
        f"(e.g. soma://{uri}?measurement=...)")


def test_our_own_soma_output_is_a_source(tmp_path: Path) -> None:
    first = tmp_path / "first"
    m1 = build(BuildConfig(sources=["synthetic://cells=300,genes=40,density=0.3"], out=first, format="both",
                           cells_per_shard=100, progress=False), log=lambda s: None)
    again = tmp_path / "again"
    m2 = build(BuildConfig(sources=[f"soma://{first / 'soma'}?filter=split == 'train'"], out=again,
                           cells_per_shard=100, progress=False), log=lambda s: None)
    assert m2["n_cells"] == m1["n_cells"] and m2["labels"] == m1["labels"]
    assert m2["datasets"] == m1["datasets"]
    assert mf.read_vocab(again) == mf.read_vocab(first)


def test_census_errors(tmp_path: Path, census_store) -> None:
    root, _ = census_store

    def fails(spec: str, **kw) -> str:
        with pytest.raises(InputError) as err:
            build(BuildConfig(sources=[spec], out=tmp_path / "bad", progress=False, **kw), log=lambda s: None)
        assert not (tmp_path / "bad" / "manifest.json").exists() and "\n" not in str(err.value)
        return str(err.value)

    assert fails("census:danio_rerio", census_uri=str(root)) == (
        f"census:danio_rerio: the Census at {root} has no census_data/danio_rerio (has: homo_sapiens, "
        "mus_musculus); pass one of those organisms")
    assert fails("census://homo_sapiens", census_uri=str(root), census_version="2023-07-25") == (
        f"census://homo_sapiens: --census-version 2023-07-25 was asked for but the store at {root} is the "
        f"{BUILD_DATE} build; point --census-uri at the 2023-07-25 copy or drop --census-version")
    assert fails("census:homo_sapiens", census_uri=str(tmp_path / "missing")).startswith(
        f"census:homo_sapiens: cannot open the Census at {tmp_path / 'missing'} (")
    assert fails(f"census:homo_sapiens?uri={root}&filter=tissue_general == 'gut'") == (
        f"census:homo_sapiens?uri={root}&filter=tissue_general == 'gut': the obs filter \"tissue_general == "
        "'gut'\" selects no cells; check the filter's column names and values")


def test_census_spec_options_and_mouse(tmp_path: Path, census_store) -> None:
    root, truth = census_store
    lines: list[str] = []
    m = build(BuildConfig(sources=[f"census://mus_musculus?uri={root}&filter=soma_joinid < 6"],
                          out=tmp_path / "c", progress=False), log=lines.append)
    expected = truth["x"][:6, :5]
    assert m["n_cells"] == int((expected.sum(axis=1) > 0).sum())
    dense, obs = _corpus(tmp_path / "c", m)
    np.testing.assert_array_equal(dense, expected[expected.sum(axis=1) > 0])
    assert any("does not mention is_primary_data" in line for line in lines)


def test_parse_spec() -> None:
    assert parse_spec("soma://a/b", "soma://", ("layer", "filter")) == ("a/b", {})
    assert parse_spec("soma://a?layer=x&filter=a == 'b' & c > 1", "soma://", ("layer", "filter")) == (
        "a", {"layer": "x", "filter": "a == 'b' & c > 1"})
    with pytest.raises(InputError, match="unknown option 'bogus'"):
        parse_spec("census:hs?bogus", "census:", ("uri",))


def test_credentials_in_uris_are_redacted_in_the_manifest() -> None:
    from scpretrain.sharding.manifest import redact

    assert redact("soma://s3://me:secret@host/atlas?layer=raw") == "soma://s3://me:***@host/atlas?layer=raw"
    assert redact("census:homo_sapiens?uri=https://u:p@h/c") == "census:homo_sapiens?uri=https://u:***@h/c"
    assert redact("data/a.h5ad") == "data/a.h5ad"


def test_loader_streams_a_census_store_with_a_filter_exactly_once(census_store) -> None:
    """The loader's SOMA reader on a Census-layout store through the real client: the filtered cells,
    each once across 2 ranks, counts as stored, obs columns beside them, soma_joinid as the cell id."""
    from scpretrain.data_loader import StreamingLoader

    root, truth = census_store
    flt = "tissue_general == 'lung' and is_primary_data == True"
    obs = truth["obs"]
    want = set(np.flatnonzero(((obs["tissue_general"] == "lung") & obs["is_primary_data"]).to_numpy()).tolist())
    seen, per_rank = [], []
    for rank in range(2):
        L = StreamingLoader(None, backend="soma", soma_uri=str(root), census_organism="homo_sapiens",
                            soma_filter=flt, batch_size=16, seed=0, rank=rank, world_size=2,
                            obs_columns=["cell_type", "tissue_general"])
        assert L.block_size == 256  # another store: assumed sorted, small blocks
        n = 0
        for b in L:
            ids = b["cell_id"].numpy()
            ptr, idx, dat = b["indptr"].numpy(), b["indices"].numpy(), b["data"].numpy()
            for i, cid in enumerate(ids):
                row = np.zeros(truth["x"].shape[1], dtype=np.float32)
                row[idx[ptr[i]:ptr[i + 1]]] = dat[ptr[i]:ptr[i + 1]]
                np.testing.assert_array_equal(row, truth["x"][cid])
            assert set(b["obs"]["tissue_general"]) == {"lung"}
            assert list(b["obs"]["cell_type"]) == obs["cell_type"].to_numpy()[ids].tolist()
            seen += ids.tolist()
            n += 1
        per_rank.append(n)
    assert per_rank[0] == per_rank[1]
    assert len(seen) == len(set(seen)) and set(seen) <= want and len(want) - len(seen) < 2
    with pytest.raises(KeyError, match="obs has no column"):
        StreamingLoader(None, backend="soma", soma_uri=str(root), census_organism="homo_sapiens",
                        batch_size=16, seed=0, rank=0, world_size=1, obs_columns=["no_such_column"])


def test_redaction_covers_slashes_tokens_and_query_strings() -> None:
    from scpretrain.sharding.manifest import redact, redact_tree

    assert redact("postgresql://mlflow:pa/ss@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert redact("https://ghp_abcdef@host/repo") == "https://***@host/repo"
    assert redact("https://h/x?token=abc123&layer=raw") == "https://h/x?token=***&layer=raw"
    assert redact("s3://b/k?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA/2026") == \
        "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redact_tree({"tracking": {"mlflow_uri": "http://u:p@h"}, "x": [1, "a"]}) == \
        {"tracking": {"mlflow_uri": "http://u:***@h"}, "x": [1, "a"]}
