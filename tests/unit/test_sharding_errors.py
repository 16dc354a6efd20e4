"""One test per bad-input row: the exact one-line message, and nothing published afterwards."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scpretrain.sharding.build import BuildConfig, build
from scpretrain.sharding.errors import InputError

REPO = Path(__file__).resolve().parents[2]


def _h5ad(path: Path, x: np.ndarray | sp.spmatrix, *, genes: list[str] | None = None,
          cells: list[str] | None = None, layers: dict | None = None) -> Path:
    n, g = x.shape
    obs = pd.DataFrame({"cell_type": ["T"] * n}, index=cells or [f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=genes or [f"G{j}" for j in range(g)])
    with warnings.catch_warnings():  # anndata warns about duplicate names: we are making them on purpose
        warnings.simplefilter("ignore")
        ad.AnnData(X=x, obs=obs, var=var, layers=layers or {}).write_h5ad(path)
    return path


def _good(n: int = 40, g: int = 10, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).poisson(1.0, size=(n, g)).astype(np.float32)
    x[:, 0] += 1  # no empty cells
    return x


def _fails(tmp_path: Path, src: Path | str, **kw) -> str:
    out = tmp_path / "corpus"
    with pytest.raises(InputError) as err:
        build(BuildConfig(sources=[str(src)], out=out, progress=False, **kw), log=lambda s: None)
    assert not (out / "manifest.json").exists() and not (out / ".build").exists()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_duplicate_gene_ids(tmp_path: Path) -> None:
    genes = ["A", "B", "A"] + [f"G{j}" for j in range(6)] + ["B"]
    src = _h5ad(tmp_path / "a.h5ad", sp.csr_matrix(_good()), genes=genes)
    assert _fails(tmp_path, src) == (
        f"{src}: var has 2 duplicate ids (e.g. A, B); gene ids must be unique (drop or rename the duplicated "
        "genes, e.g. var_names_make_unique(), and re-save)")


def test_duplicate_cell_ids(tmp_path: Path) -> None:
    cells = [f"c{i}" for i in range(38)] + ["c1", "c2"]
    src = _h5ad(tmp_path / "a.h5ad", sp.csr_matrix(_good()), cells=cells)
    assert _fails(tmp_path, src) == (
        f"{src}: obs has 2 duplicate ids (e.g. c1, c2); cell ids must be unique within a file "
        "(obs_names_make_unique() and re-save)")


def test_negative_counts_are_counted_across_blocks(tmp_path: Path) -> None:
    x = _good()
    x[1, 2], x[20, 3], x[39, 4] = -1, -2, -5
    src = _h5ad(tmp_path / "a.h5ad", sp.csr_matrix(x))
    assert _fails(tmp_path, src, block_rows=8) == (
        f"{src}: X has 3 negative values; counts must be >= 0 (pass --matrix raw or --matrix layer:NAME "
        "if the raw counts are stored elsewhere)")


def test_non_integer_counts_and_the_flag_that_accepts_them(tmp_path: Path) -> None:
    x = _good()
    x[3, 1], x[30, 2] = 0.5, 2.25
    src = _h5ad(tmp_path / "a.h5ad", sp.csr_matrix(x))
    assert _fails(tmp_path, src, block_rows=16) == (
        f"{src}: X has 2 non-integer values; counts must be whole numbers (pass --allow-non-integer if the "
        "input is normalized on purpose, or --matrix to pick the raw counts)")
    m = build(BuildConfig(sources=[str(src)], out=tmp_path / "ok", allow_non_integer=True, progress=False),
              log=lambda s: None)
    assert m["n_cells"] == 40


def test_nan_and_inf(tmp_path: Path) -> None:
    x = _good()
    x[0, 1], x[5, 1], x[9, 2] = np.nan, np.inf, -np.inf
    src = _h5ad(tmp_path / "a.h5ad", sp.csr_matrix(x))
    assert _fails(tmp_path, src, allow_non_integer=True) == (
        f"{src}: X has 1 NaN and 2 infinite values; counts must be finite (fix or remove those entries "
        "in the source)")


def test_dense_x_is_converted_on_purpose(tmp_path: Path) -> None:
    x = _good()
    src = _h5ad(tmp_path / "a.h5ad", x)
    lines: list[str] = []
    m = build(BuildConfig(sources=[str(src)], out=tmp_path / "c", progress=False), log=lines.append)
    assert f"{src}: X is dense; converting each block to CSR" in lines
    a = ad.read_zarr(tmp_path / "c" / m["zarr"]["shards"][0]["path"])
    np.testing.assert_array_equal(a.X.toarray(), x[a.obs["cell_id"].to_numpy()])


def test_cells_below_min_genes_are_dropped_and_reported(tmp_path: Path) -> None:
    x = _good()
    x[[2, 7]] = 0
    x[[2, 7], 0] = 1  # one expressed gene each
    src = _h5ad(tmp_path / "a.h5ad", sp.csr_matrix(x))
    m = build(BuildConfig(sources=[str(src)], out=tmp_path / "c", min_genes=2, progress=False),
              log=lambda s: None)
    assert m["n_cells"] == 38 and m["sources"][0]["n_dropped_min_genes"] == 2


def test_truncated_and_unreadable_h5ad(tmp_path: Path) -> None:
    good = _h5ad(tmp_path / "good.h5ad", sp.csr_matrix(_good(400, 50)))
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    message = _fails(tmp_path, cut)
    assert re.fullmatch(re.escape(f"{cut}: cannot read h5ad (") + r".*truncated.*" + re.escape(
        "); the file is truncated or not an h5ad (re-export or re-download it)"), message), message
    junk = tmp_path / "junk.h5ad"
    junk.write_text("not hdf5")
    assert _fails(tmp_path, junk).startswith(f"{junk}: cannot read h5ad (")


def test_counts_in_a_layer_are_detected_or_chosen(tmp_path: Path) -> None:
    counts = _good()
    norm = np.log1p(counts / 2).astype(np.float32)
    src = _h5ad(tmp_path / "a.h5ad", sp.csr_matrix(norm), layers={"counts": sp.csr_matrix(counts)})
    lines: list[str] = []
    m = build(BuildConfig(sources=[str(src)], out=tmp_path / "c", progress=False), log=lines.append)
    assert f"{src}: counts from layers['counts'] (auto-detected: non-negative integers)" in lines
    assert m["sources"][0]["matrix"] == "layers['counts']"
    assert _fails(tmp_path, src, matrix="raw") == (
        f"{src}: --matrix raw is not in the file; options: X, layer:counts")


def test_no_matrix_holds_counts(tmp_path: Path) -> None:
    norm = np.log1p(_good()).astype(np.float32)
    src = _h5ad(tmp_path / "a.h5ad", sp.csr_matrix(norm), layers={"scaled": sp.csr_matrix(norm - 1)})
    message = _fails(tmp_path, src)
    assert message.startswith(f"{src}: no matrix holds non-negative integer counts (X: ")
    assert message.endswith("pass --matrix with one of X, layer:scaled")


def test_low_gene_coverage_is_refused(tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.tsv"
    vocab.write_text("gene_id\tsymbol\n" + "".join(f"ENSG{j:011d}\tG{j}\n" for j in range(4)))
    src = _h5ad(tmp_path / "a.h5ad", sp.csr_matrix(_good()))  # genes G0..G9: 4 of 10 match by symbol
    assert _fails(tmp_path, src, vocab=vocab) == (
        f"{src}: var: only 4 of 10 genes (40.0%) match the vocabulary (best: var_names -> vocab symbol); "
        "at least 50% required (use a --vocab with the same species and id type, or lower --min-coverage)")


def test_missing_keep_obs_column(tmp_path: Path) -> None:
    src = _h5ad(tmp_path / "a.h5ad", sp.csr_matrix(_good()))
    assert _fails(tmp_path, src, keep_obs=["donor"]) == (
        f"{src}: obs has no column 'donor' (from --keep-obs); available: cell_type (drop it from --keep-obs)")


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    x = _good()
    x[0, 0] = -3
    src = _h5ad(tmp_path / "a.h5ad", sp.csr_matrix(x))
    out = tmp_path / "corpus"
    cmd = [sys.executable, "-m", "sharding", "build", "--source", str(src), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {src}: X has 1 negative values; counts must be >= 0 (pass --matrix raw "
                           "or --matrix layer:NAME if the raw counts are stored elsewhere)\n")
    assert "Traceback" not in proc.stdout and not (out / "manifest.json").exists()


def test_cli_verify_and_inspect(tmp_path: Path) -> None:
    out = tmp_path / "c"
    build(BuildConfig(sources=["synthetic://cells=300,genes=40,density=0.3"], out=out, cells_per_shard=100,
                      progress=False), log=lambda s: None)
    run = [sys.executable, "-c", "import sys; from sharding.__main__ import main; "
           "[print(main(a.split()), flush=True) for a in sys.argv[1:]]",
           f"verify {out}", f"inspect {out}", f"verify {tmp_path}"]
    (out / "zarr" / "shard-00002.zarr" / "X" / "indices" / "c" / "0").unlink()
    proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[0] == "1"
    assert "zarr/shard-00002.zarr: X/indices is missing 1 of 1 chunks (c/0)" in proc.stderr
    assert "cells 300" in proc.stdout and "datasets (4)" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "2"
    assert f"error: {tmp_path}: no manifest.json; this is not a complete corpus" in proc.stderr
