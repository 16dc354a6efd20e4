"""10x sources: Matrix Market directories and CellRanger h5 files, counts round-tripped exactly."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from scpretrain.sharding import manifest as mf
from scpretrain.sharding.build import BuildConfig, build
from scpretrain.sharding.check import verify
from scpretrain.sharding.errors import InputError
from scpretrain.sharding.sources import tenx

N_CELLS, N_GENES, N_ADT = 90, 30, 3
EMPTY_CELLS = (0, 41, 42, 89)  # one at each end and two inside a block


def _counts(seed: int = 0) -> np.ndarray:
    """cells x (genes + antibody) integer counts; a few all-zero cells."""
    x = np.random.default_rng(seed).poisson(0.4, size=(N_CELLS, N_GENES + N_ADT)).astype(np.int64)
    x[:, N_GENES:] *= 50  # antibody counts are large: they must not leak into the corpus
    x[list(EMPTY_CELLS), :N_GENES] = 0
    return x


def _features() -> pd.DataFrame:
    ids = [f"ENSG{j:011d}" for j in range(N_GENES)] + [f"CD{j}_TotalSeqB" for j in range(N_ADT)]
    names = [f"GENE{j}" for j in range(N_GENES)] + [f"CD{j}" for j in range(N_ADT)]
    types = ["Gene Expression"] * N_GENES + ["Antibody Capture"] * N_ADT
    return pd.DataFrame({"id": ids, "name": names, "type": types})


def _barcodes() -> list[str]:
    return [f"AAAC{i:06d}-1" for i in range(N_CELLS)]


def _write_tsv(path: Path, frame: pd.DataFrame) -> None:
    text = frame.to_csv(sep="\t", header=False, index=False)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def _mtx_dir(root: Path, x: np.ndarray, *, gene_major: bool = False, v2: bool = False) -> Path:
    """A CellRanger-like folder; entries grouped by barcode unless gene_major."""
    d = root / "sample1" / "outs" / "filtered_feature_bc_matrix"
    d.mkdir(parents=True)
    genes_by_cells = sp.csr_matrix(x.T) if gene_major else sp.csc_matrix(x.T)
    if v2:
        scipy.io.mmwrite(d / "matrix.mtx", genes_by_cells[:N_GENES], field="integer")
        _write_tsv(d / "genes.tsv", _features()[["id", "name"]].iloc[:N_GENES])
        _write_tsv(d / "barcodes.tsv", pd.DataFrame({"b": _barcodes()}))
        return d
    scipy.io.mmwrite(d / "matrix.mtx", genes_by_cells, field="integer")
    with open(d / "matrix.mtx", "rb") as src, gzip.open(d / "matrix.mtx.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    (d / "matrix.mtx").unlink()
    _write_tsv(d / "features.tsv.gz", _features())
    _write_tsv(d / "barcodes.tsv.gz", pd.DataFrame({"b": _barcodes()}))
    return d


def _h5(path: Path, x: np.ndarray, *, v2: bool = False) -> Path:
    feats = _features()
    if v2:
        feats, x = feats.iloc[:N_GENES], x[:, :N_GENES]
    csc = sp.csc_matrix(x.T.astype(np.int32))  # features x barcodes, compressed by barcode
    with h5py.File(path, "w") as f:
        g = f.create_group("GRCh38" if v2 else "matrix")
        g.create_dataset("data", data=csc.data, compression="gzip")
        g.create_dataset("indices", data=csc.indices.astype(np.int64), compression="gzip")
        g.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
        g.create_dataset("barcodes", data=np.array(_barcodes(), dtype="S"))
        if v2:
            g.create_dataset("genes", data=feats["id"].to_numpy().astype("S"))
            g.create_dataset("gene_names", data=feats["name"].to_numpy().astype("S"))
        else:
            fg = g.create_group("features")
            fg.create_dataset("id", data=feats["id"].to_numpy().astype("S"))
            fg.create_dataset("name", data=feats["name"].to_numpy().astype("S"))
            fg.create_dataset("feature_type", data=feats["type"].to_numpy().astype("S"))
            fg.create_dataset("genome", data=np.array([b"GRCh38"] * len(feats)))
    return path


def _build(tmp: Path, source: Path, name: str = "corpus", **kw) -> tuple[Path, dict]:
    out = tmp / name
    cfg = dict(cells_per_shard=32, block_rows=16, progress=False)
    return out, build(BuildConfig(sources=[str(source)], out=out, **{**cfg, **kw}), log=lambda s: None)


def _dense(out: Path, m: dict) -> np.ndarray:
    dense = np.full((m["n_cells"], m["n_genes"]), -1, dtype=np.float32)
    for shard in m["zarr"]["shards"]:
        a = ad.read_zarr(out / shard["path"])
        dense[a.obs["cell_id"].to_numpy()] = a.X.toarray()
    return dense


def _expected(x: np.ndarray) -> np.ndarray:
    gex = x[:, :N_GENES].astype(np.float32)
    return gex[gex.sum(axis=1) > 0]


@pytest.mark.parametrize("gene_major", [False, True], ids=["grouped-by-barcode", "gene-major"])
def test_mtx_directory_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gene_major: bool) -> None:
    monkeypatch.setattr(tenx, "MTX_CHUNK", 37)  # chunks end mid-cell and mid-block
    x = _counts()
    d = _mtx_dir(tmp_path, x, gene_major=gene_major)
    out, m = _build(tmp_path, d, format="both")
    np.testing.assert_array_equal(_dense(out, m), _expected(x))
    assert [g for g, _ in mf.read_vocab(out)] == [f"ENSG{j:011d}" for j in range(N_GENES)]
    assert [s for _, s in mf.read_vocab(out)][:2] == ["GENE0", "GENE1"]
    src = m["sources"][0]
    assert src["kind"] == "10x-mtx" and src["matrix"] == "matrix.mtx.gz" and src["gene_coverage"] == 1.0
    assert src["n_cells_in"] == N_CELLS and src["n_dropped_min_genes"] == len(EMPTY_CELLS)
    assert m["datasets"] == {"sample1": N_CELLS - len(EMPTY_CELLS)} and verify(out) == []
    assert src["sha256"] and len(src["sha256"]) == 64


def test_mtx_v2_genes_tsv_and_symbol_vocab(tmp_path: Path) -> None:
    x = _counts(1)
    d = _mtx_dir(tmp_path, x, v2=True)
    vocab = tmp_path / "vocab.tsv"
    mf.write_vocab(vocab, [(f"OTHER{j}", f"GENE{j}") for j in reversed(range(N_GENES))])
    lines: list[str] = []
    out = tmp_path / "c"
    m = build(BuildConfig(sources=[str(d)], out=out, vocab=vocab, block_rows=16, progress=False),
              log=lines.append)
    assert any("var['gene_symbols'] -> vocab symbol" in line for line in lines)
    np.testing.assert_array_equal(_dense(out, m), _expected(x)[:, ::-1])


def test_mtx_notes_and_antibody_features_skipped(tmp_path: Path) -> None:
    d = _mtx_dir(tmp_path, _counts())
    lines: list[str] = []
    build(BuildConfig(sources=[str(d / "matrix.mtx.gz")], out=tmp_path / "c", progress=False),
          log=lines.append)
    assert f"{d / 'features.tsv.gz'}: kept {N_GENES} 'Gene Expression' features, skipped {N_ADT} " \
           "'Antibody Capture'" in lines


def _fails(tmp: Path, source: Path, **kw) -> str:
    out = tmp / "failed"
    with pytest.raises(InputError) as err:
        build(BuildConfig(sources=[str(source)], out=out, block_rows=16, progress=False, **kw),
              log=lambda s: None)
    assert not (out / "manifest.json").exists() and not (out / ".build").exists()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_mtx_gene_major_over_the_memory_limit_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tenx, "MAX_UNSORTED_NNZ", 10)
    d = _mtx_dir(tmp_path, _counts(), gene_major=True)
    nnz = int(np.count_nonzero(_counts()))
    assert _fails(tmp_path, d) == (
        f"{d / 'matrix.mtx.gz'}: entries are not grouped by barcode (column) and the matrix has {nnz} "
        "entries, more than the 10 read in memory; rewrite it column-major (e.g. scipy.io.mmwrite of a CSC "
        "matrix) or convert it to h5ad")


def test_mtx_order_broken_after_streaming_started(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tenx, "MTX_CHUNK", 40)
    x = _counts()
    d = _mtx_dir(tmp_path, x, v2=True)
    path = d / "matrix.mtx"
    lines = path.read_text().splitlines()
    header = [i for i, line in enumerate(lines) if not line.startswith("%")][0] + 1
    body = lines[header:]
    body.append(body.pop(3))  # an entry of cell 1 moved to the end
    path.write_text("\n".join(lines[:header] + body) + "\n")
    assert _fails(tmp_path, d).startswith(f"{path}: entries are not grouped by barcode (column) past entry ")


def test_mtx_truncated_and_mismatched(tmp_path: Path) -> None:
    d = _mtx_dir(tmp_path, _counts(), v2=True)
    path = d / "matrix.mtx"
    text = path.read_text().splitlines()
    nnz = int(np.count_nonzero(_counts()[:, :N_GENES]))
    path.write_text("\n".join(text[:-5]) + "\n")
    assert _fails(tmp_path, d) == (f"{path}: {nnz - 5} entries but the size line promises {nnz}; the file is "
                                   "truncated (re-download or re-export it)")
    (d / "barcodes.tsv").write_text("only-one\n")
    assert _fails(tmp_path, d) == (
        f"{path}: size line says {N_GENES} features x {N_CELLS} barcodes but genes.tsv has {N_GENES} and "
        "barcodes.tsv has 1; the files come from different runs (re-export them together)")
    (d / "barcodes.tsv").unlink()
    assert _fails(tmp_path, d) == (
        f"{d}: 10x directory lacks barcodes.tsv(.gz); pass the folder that holds matrix.mtx, features.tsv "
        "and barcodes.tsv (e.g. outs/filtered_feature_bc_matrix)")


def test_mtx_bad_values_and_duplicate_barcodes(tmp_path: Path) -> None:
    x = _counts()
    x[5, 2], x[60, 7] = -3, -1
    d = _mtx_dir(tmp_path, x)
    assert _fails(tmp_path, d) == (
        f"{d}: matrix.mtx.gz has 2 negative values; counts must be >= 0 (pass --matrix raw or --matrix "
        "layer:NAME if the raw counts are stored elsewhere)")
    _write_tsv(d / "barcodes.tsv.gz", pd.DataFrame({"b": _barcodes()[:-1] + _barcodes()[:1]}))
    assert _fails(tmp_path, d) == (
        f"{d}: obs has 1 duplicate ids (e.g. AAAC000000-1); cell ids must be unique within a file "
        "(obs_names_make_unique() and re-save)")


@pytest.mark.parametrize("v2", [False, True], ids=["v3", "v2"])
def test_h5_round_trip(tmp_path: Path, v2: bool) -> None:
    x = _counts(3)
    path = _h5(tmp_path / "sample7_filtered_feature_bc_matrix.h5", x, v2=v2)
    out, m = _build(tmp_path, path, cells_per_shard=50)
    np.testing.assert_array_equal(_dense(out, m), _expected(x))
    src = m["sources"][0]
    assert src["kind"] == "10x-h5" and src["matrix"] == ("GRCh38/data" if v2 else "matrix/data")
    assert src["sha256"] == mf.file_sha256(path) and m["datasets"] == {"sample7": N_CELLS - len(EMPTY_CELLS)}


def test_h5_mixed_with_h5ad_and_bad_h5(tmp_path: Path) -> None:
    x = _counts(4)
    h5 = _h5(tmp_path / "s.h5", x)
    other = np.random.default_rng(5).poisson(1.0, size=(20, N_GENES)).astype(np.float32) + 1
    h5ad = tmp_path / "a.h5ad"
    ad.AnnData(X=sp.csr_matrix(other), var=pd.DataFrame(index=[f"GENE{j}" for j in range(N_GENES)])
               ).write_h5ad(h5ad)
    out = tmp_path / "c"
    m = build(BuildConfig(sources=[str(h5), str(h5ad)], out=out, progress=False), log=lambda s: None)
    np.testing.assert_array_equal(_dense(out, m), np.vstack([_expected(x), other]))
    assert m["sources"][1]["matched_by"] == "var_names -> vocab symbol"

    with h5py.File(h5, "r+") as f:
        del f["matrix"]["barcodes"]
        f["matrix"].create_dataset("barcodes", data=np.array([b"x"] * 3))
    assert _fails(tmp_path, h5) == (
        f"{h5}: matrix: shape is {N_GENES + N_ADT} features x {N_CELLS} barcodes but it lists "
        f"{N_GENES + N_ADT} features and 3 barcodes; the file is corrupt (re-run cellranger or re-download "
        "it)")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    assert _fails(tmp_path, junk).startswith(f"{junk}: cannot read 10x h5 (")


def test_dataset_names() -> None:
    assert tenx.dataset_name(Path("/d/sample1/outs/filtered_feature_bc_matrix")) == "sample1"
    assert tenx.dataset_name(Path("/d/pbmc/filtered_gene_bc_matrices/GRCh38")) == "pbmc"
    assert tenx.dataset_name(Path("/d/run3/outs/filtered_feature_bc_matrix.h5")) == "run3"
    assert tenx.dataset_name(Path("/d/lung_filtered_feature_bc_matrix.h5")) == "lung"
