"""Bad query input through `python -m evaluate annotate`: exit 2, one line naming the problem, no output file;
and what annotate's defaults do (calibrated Unassigned, the baseline beside the model)."""
from __future__ import annotations

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from scpretrain.evaluate.annotate import calibrate_threshold
from scpretrain.scmodels.genes import normalize_gene_id
from tests.unit.test_evaluate_cli import _adata, cli, files  # noqa: F401, F811  (files: the module fixture)


@pytest.mark.parametrize("raw, normalized", [
    ("ENSG00000141510.17", "ENSG00000141510"),
    ("ENSG00000141510", "ENSG00000141510"),
    (" ENSG00000141510.3 ", "ENSG00000141510"),
    ("ENSG00000182378.14_PAR_Y", "ENSG00000182378_PAR_Y"),
    ("ENSG00000182378_PAR_Y", "ENSG00000182378_PAR_Y"),
    ("ENST00000269305.9", "ENST00000269305"),
    ("ENSMUSG00000064370.1", "ENSMUSG00000064370"),
    ("AC000061.1", "AC000061.1"),
    ("MT-CO1", "MT-CO1"),
    ("RP11-206L10.2", "RP11-206L10.2"),
    ("TP53", "TP53"),
])
def test_one_gene_id_normalization_for_builder_and_evaluate(raw, normalized):
    from scpretrain.evaluate.align import strip_version as evaluate_norm
    from scpretrain.sharding.vocab import strip_version as sharding_norm

    assert normalize_gene_id(raw) == normalized
    assert sharding_norm is normalize_gene_id and evaluate_norm is normalize_gene_id


def _annotate(files, query, tmp_path, *extra):
    q, out = tmp_path / "q.h5ad", tmp_path / "out.h5ad"
    query.write_h5ad(q)
    r = cli("annotate", "--export", files / "mae", "--reference", files / "ref.h5ad", "--label-key",
            "cell_type", "--query", q, "--out", out, "--mode", "frozen", "--max-epochs", "20", *extra)
    return r, out


def _refused(r, out, *words):
    assert r.returncode == 2, r.stdout + r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(w in line for w in words), line
    assert not out.exists() and not list(out.parent.glob(".out.h5ad*"))


def test_nan_and_inf_refused(files, tmp_path):
    q = _adata(4, seed=5)
    x = q.X.toarray()
    x[0, 3], x[2, 7] = np.nan, np.inf
    q.X = sp.csr_matrix(x)
    r, out = _annotate(files, q, tmp_path)
    _refused(r, out, "q.h5ad", "2 NaN/inf values", "nan_to_num")


def test_log_normalized_refused_unless_counts_found_or_allowed(files, tmp_path):
    q = _adata(4, seed=5)
    counts = q.X.copy()
    q.X = sp.csr_matrix(np.log1p(counts.toarray() / counts.sum(1).A * 1e4))
    r, out = _annotate(files, q, tmp_path)
    _refused(r, out, "no raw counts found", "non-integer", "--allow-normalized", "layers['counts']")
    q.layers["counts"] = counts  # the usual scanpy layout: the counts are found there
    r, out = _annotate(files, q, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "counts from layers['counts'] (not X: X: " in r.stdout
    del q.layers["counts"]
    r, out = _annotate(files, q, tmp_path, "--allow-normalized")
    assert r.returncode == 0, r.stderr and out.exists()


def test_scaled_negative_values_refused(files, tmp_path):
    q = _adata(4, seed=5)
    x = q.X.toarray()
    q.X = (x - x.mean(0)) / (x.std(0) + 1)
    r, out = _annotate(files, q, tmp_path)
    _refused(r, out, "negative values")


def test_duplicated_genes_refused_or_summed(files, tmp_path):
    q = _adata(4, seed=5)
    dup = anndata.concat([q, q[:, :3]], axis=1, merge="same")  # genes 0..2 twice
    dup.obs = q.obs.copy()
    r, out = _annotate(files, dup, tmp_path)
    _refused(r, out, "3 duplicated gene name(s)", "--sum-duplicates")
    r, out = _annotate(files, dup, tmp_path, "--sum-duplicates")
    assert r.returncode == 0, r.stderr


def test_empty_query_refused(files, tmp_path):
    q = _adata(4, seed=5)[:0].copy()
    r, out = _annotate(files, q, tmp_path)
    _refused(r, out, "no cells")


def test_zero_count_cells_dropped_and_reported(files, tmp_path):
    q = _adata(4, seed=5)
    x = q.X.toarray()
    x[[1, 5]] = 0
    q.X = sp.csr_matrix(x)
    r, out = _annotate(files, q, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "dropped 2 of 12 cells with zero counts" in r.stdout
    ann = anndata.read_h5ad(out)
    assert ann.n_obs == 10 and ann.uns["evaluate"]["n_dropped_empty"] == 2
    assert q.obs_names[1] not in ann.obs_names


def test_all_zero_query_refused(files, tmp_path):
    q = _adata(4, seed=5)
    q.X = sp.csr_matrix(q.shape, dtype=np.float32)
    r, out = _annotate(files, q, tmp_path)
    _refused(r, out, "none of its 12 cells has counts")


def test_calibrate_threshold_rejects_at_most_the_rate():
    top = np.array([0.2, 0.4, 0.4, 0.6, 0.8, 0.8, 0.8, 1.0, 1.0, 1.0])
    assert calibrate_threshold(top, 0.0) == 0.2  # nothing below the smallest
    assert calibrate_threshold(top, 0.1) == 0.4  # one cell (0.2) below
    assert calibrate_threshold(top, 0.2) == 0.4  # ties: 0.6 would reject three
    t = calibrate_threshold(top, 0.35)
    assert t == 0.6 and np.mean(top < t) <= 0.35


def test_default_annotate_calibrates_and_compares_with_the_baseline(files, tmp_path):
    q, out = tmp_path / "q.h5ad", tmp_path / "out.h5ad"
    _adata(10, seed=5).write_h5ad(q)
    r = cli("annotate", "--export", files / "mae", "--reference", files / "ref.h5ad", "--label-key",
            "cell_type", "--query", q, "--out", out, "--max-epochs", "20")
    assert r.returncode == 0, r.stderr
    info = anndata.read_h5ad(out).uns["evaluate"]
    cal = info["calibration"]
    assert cal["heldout_reject_rate"] <= 0.05 and cal["target_reject_rate"] == 0.05
    assert info["threshold"] == cal["threshold"]
    assert set(info["heldout"]) >= {"model", "baseline", "candidates", "n_heldout"}
    assert "calibrated on" in r.stdout and "logistic regression baseline" in r.stdout
    assert "mode auto:" in r.stdout  # both candidates were scored
    ann = anndata.read_h5ad(out)
    prob = ann.obs["predicted_cell_type_probability"].to_numpy()
    assert np.array_equal(ann.obs["predicted_cell_type"].astype(str).to_numpy() == "Unassigned",
                          prob < cal["threshold"])
    r = cli("annotate", "--export", files / "mae", "--reference", files / "ref.h5ad", "--label-key",
            "cell_type", "--query", q, "--out", out, "--max-epochs", "20", "--mode", "frozen",
            "--no-unassigned")
    assert r.returncode == 0, r.stderr
    assert "Unassigned" not in set(anndata.read_h5ad(out).obs["predicted_cell_type"].astype(str))


def test_warning_when_the_baseline_is_better(files, tmp_path):
    # an untrained export (random weights) against the baseline on cells with clear markers
    q, out = tmp_path / "q.h5ad", tmp_path / "out.h5ad"
    _adata(10, seed=5).write_h5ad(q)
    r = cli("annotate", "--export", files / "performer", "--reference", files / "ref.h5ad", "--label-key",
            "cell_type", "--query", q, "--out", out, "--mode", "frozen", "--head", "linear", "--max-epochs", "3")
    assert r.returncode == 0, r.stderr
    info = anndata.read_h5ad(out).uns["evaluate"]["heldout"]
    assert info["baseline"]["macro_f1"] > info["model"]["macro_f1"]
    assert "warning: the baseline beats the model on held-out reference cells" in r.stdout
