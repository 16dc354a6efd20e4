"""`evaluate integrate`: scIB metrics (scib-metrics) on embeddings, beside a PCA baseline, from the API and the CLI."""
from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scpretrain import evaluate
from scpretrain.evaluate.__main__ import main
from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.integrate import (
    AGGREGATES,
    BASELINE,
    BATCH_METRICS,
    BIO_METRICS,
    groups,
    integrate,
    integration_metrics,
)
from tests.unit.test_evaluate_api import (
    _one_thread,  # noqa: F401  (autouse fixture)
    make_adata,
    make_model,
    write,
)

METRICS = (*BATCH_METRICS, *BIO_METRICS)


def labelled(n: int, seed: int = 0) -> anndata.AnnData:
    """Counts of three types (make_adata) with a random two-level batch column."""
    a = make_adata(n, seed=seed)
    a.obs["batch"] = np.random.default_rng(seed + 100).choice(["b1", "b2"], size=a.n_obs)
    return a


def rings(sizes: list[int], centres: np.ndarray) -> np.ndarray:
    """Equally spaced points on a unit circle around each centre: each point's nearest neighbours are the
    next ones round its own ring, so every ring's kNN graph is one strongly connected component."""
    out = []
    for n, c in zip(sizes, centres):
        t = 2 * np.pi * np.arange(n) / n
        out.append(c + np.c_[np.cos(t), np.sin(t)])
    return np.concatenate(out).astype(np.float32)


def codes(values) -> np.ndarray:
    return pd.factorize(np.asarray(values), sort=True)[0].astype(np.int32)


# --- the metrics on cases worked by hand -----------------------------------------------------------------

def test_hand_worked_cases():
    """Type A: 30 cells on one ring and 10 on another far away; type B: 40 cells on a third ring; round
    every ring the batches alternate. By hand, with 5 neighbours (the next ones round the ring):
    graph connectivity = mean(30/40, 40/40) = 0.875; each neighbourhood is one type, so scaled cLISI is 1;
    both batches are in every neighbourhood (iLISI above 0; LISI leaves the cell itself out, so its two
    nearest are the other batch and the scaled iLISI stays well below 1 at perplexity 3)."""
    x = rings([30, 10, 40], np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]]))
    labels = codes(["A"] * 40 + ["B"] * 40)
    batches = codes(np.tile(["b1", "b2"], 40))
    g = groups(anndata.AnnData(obs=pd.DataFrame({"t": labels.astype(str), "b": batches.astype(str)})), "t", "b")
    with pytest.raises(EvaluateError, match=r"LISI of batches: the neighbourhood of 80 of 80 cells is degenerate"):
        integration_metrics(x, g, n_neighbors=5)
    m = integration_metrics(x, g, n_neighbors=9)
    assert m["graph_connectivity"] == pytest.approx(0.875)
    assert m["clisi"] == pytest.approx(1.0, abs=1e-3)
    assert m["ilisi"] > 0.15 and m["kbet"] > 0.9
    # the same points, the batch now the ring: batches never meet, so iLISI and kBET fall to ~0
    by_blob = codes(["b1"] * 30 + ["b2"] * 10 + ["b1"] * 40)
    g2 = groups(anndata.AnnData(obs=pd.DataFrame({"t": labels.astype(str), "b": by_blob.astype(str)})), "t", "b")
    m2 = integration_metrics(x, g2, n_neighbors=9)
    assert m2["ilisi"] < 0.05 and m2["kbet"] < 0.05
    assert m2["batch"] < m["batch"] - 0.4
    # type separation does not depend on the batches; the isolated label does (B is now in one batch only)
    for key in ("label_asw", "nmi", "ari", "clisi"):
        assert m2[key] == pytest.approx(m[key], abs=1e-6)
    for row in (m, m2):
        assert row["batch"] == pytest.approx(np.mean([row[k] for k in BATCH_METRICS]))
        assert row["bio"] == pytest.approx(np.mean([row[k] for k in BIO_METRICS]))
        assert row["total"] == pytest.approx(0.4 * row["batch"] + 0.6 * row["bio"])


def test_lisi_scores_are_the_librarys():
    """iLISI / cLISI are computed from per-cell LISI (to count failed cells): the same as the library's."""
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    from scpretrain.evaluate.integrate import _scaled_lisi

    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 4)).astype(np.float32)
    lab, bat = rng.integers(0, 3, 150), rng.integers(0, 2, 150)
    d, i = NearestNeighbors(n_neighbors=30).fit(x).kneighbors(x)
    knn = NeighborsResults(indices=i.astype(np.int32), distances=d.astype(np.float32))
    assert _scaled_lisi(scib_metrics, knn, bat, "batches") == pytest.approx(scib_metrics.ilisi_knn(knn, bat), abs=1e-6)
    assert _scaled_lisi(scib_metrics, knn, lab, "labels") == pytest.approx(scib_metrics.clisi_knn(knn, lab), abs=1e-6)


def test_embeddings_are_ranked_as_constructed():
    """good: types apart, batches mixed; batchy: the same plus one axis that splits the batches;
    noise: no structure. good beats batchy on batch correction and noise on bio conservation, and the
    PCA baseline of the counts comes first."""
    a = labelled(40)
    rng = np.random.default_rng(0)
    lab = codes(a.obs["cell_type"])
    good = np.c_[np.eye(3)[lab] * 5 + rng.normal(0, 1, (a.n_obs, 3)), rng.normal(0, 1, (a.n_obs, 3))]
    a.obsm["X_good"] = good
    a.obsm["X_batchy"] = np.c_[good, (a.obs["batch"] == "b2").to_numpy()[:, None] * 8.0]
    a.obsm["X_noise"] = rng.normal(0, 1, (a.n_obs, 6))
    t = integrate(a, ["X_good", "X_batchy", "X_noise"], "batch", "cell_type", verbose=False)
    assert list(t.index) == [BASELINE, "X_good", "X_batchy", "X_noise"]
    assert list(t.columns) == [*METRICS, *AGGREGATES]
    rest = t.drop(columns="ari").to_numpy()
    assert ((rest >= 0) & (rest <= 1)).all() and (t["ari"] <= 1).all()
    assert t.loc["X_noise", "ari"] == pytest.approx(0.0, abs=0.05)  # chance-adjusted: may dip below 0
    assert t.loc["X_good", "batch"] > t.loc["X_batchy", "batch"] + 0.3
    assert t.loc["X_batchy", "ilisi"] < 0.1 and t.loc["X_good", "ilisi"] > 0.7
    assert t.loc["X_good", "bio"] > t.loc["X_noise", "bio"] + 0.3
    assert t.loc["X_good", "nmi"] == pytest.approx(1.0) and t.loc["X_noise", "nmi"] < 0.2
    # the counts separate the types by construction: the baseline conserves them too
    assert t.loc[BASELINE, "label_asw"] > 0.6 and t.loc[BASELINE, "ari"] > 0.9


def test_api_refuses_bad_input_before_any_metric():
    a = labelled(5)
    a.obsm["X_e"] = np.zeros((a.n_obs, 2))
    with pytest.raises(EvaluateError, match=r"obs has no column 'donor' \(--batch-key\)"):
        integrate(a, ["X_e"], "donor", "cell_type")
    with pytest.raises(EvaluateError, match=r"obsm has no embedding 'X_mae'; available: X_e"):
        integrate(a, ["X_mae"], "batch", "cell_type")
    with pytest.raises(EvaluateError, match=r"shape \(14, 2\) does not match the data's 15 cells"):
        integrate(a, {"short": np.zeros((14, 2))}, "batch", "cell_type")
    with pytest.raises(EvaluateError, match="NaN/inf"):
        integrate(a, {"nan": np.full((15, 2), np.nan)}, "batch", "cell_type")
    a.obs.loc[a.obs_names[0], "cell_type"] = np.nan
    with pytest.raises(EvaluateError, match=r"obs\['cell_type'\] \(--label-key\) is missing for 1 cell"):
        integrate(a, ["X_e"], "batch", "cell_type")


# --- the command line ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("integrate_cli")
    write(make_model("mae"), d / "mae")
    labelled(30, seed=3).write_h5ad(d / "cells.h5ad")
    return d


def test_cli_scores_an_export_beside_the_baseline(files, tmp_path, capsys):
    out = tmp_path / "integration"
    assert main(["integrate", "--adata", str(files / "cells.h5ad"), "--batch-key", "batch", "--label-key",
                 "cell_type", "--export", str(files / "mae"), "--out-dir", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    tsv = pd.read_csv(out / "integration.tsv", sep="\t", index_col=0)
    assert list(tsv.index) == [BASELINE, "X_mae (mae)"] and list(tsv.columns) == [*METRICS, *AGGREGATES]
    assert "X_mae (mae)" in printed and "wrote" in printed
    doc = json.loads((out / "integration.json").read_text())
    assert doc["n_cells"] == 90 and doc["batch_key"] == "batch" and doc["library"].startswith("scib-metrics 0.")
    assert doc["weights"] == {"batch": 0.4, "bio": 0.6}
    # the figures are the API's on the same embedding, and the JSON holds them unrounded
    a = anndata.read_h5ad(files / "cells.h5ad")
    evaluate.embed(evaluate.load_export(files / "mae"), a, verbose=False)
    direct = integrate(a, ["X_mae"], "batch", "cell_type", verbose=False)
    for m in (*METRICS, *AGGREGATES):
        assert doc["scores"]["X_mae (mae)"][m] == pytest.approx(direct.loc["X_mae", m], abs=1e-6)
        assert doc["scores"][BASELINE][m] == pytest.approx(direct.loc[BASELINE, m], abs=1e-6)
        assert tsv.loc["X_mae (mae)", m] == pytest.approx(direct.loc["X_mae", m], abs=1e-4)
    png = (out / "integration.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # an embedding given as a file, with the draw of --max-cells applied to it and the baseline off
    np.save(tmp_path / "emb.npy", a.obsm["X_mae"])
    assert main(["integrate", "--adata", str(files / "cells.h5ad"), "--batch-key", "batch", "--label-key",
                 "cell_type", "--embedding", str(tmp_path / "emb.npy"), "--max-cells", "60", "--no-baseline",
                 "--out-dir", str(tmp_path / "sub"), "--quiet"]) == 0
    sub = json.loads((tmp_path / "sub" / "integration.json").read_text())
    assert list(sub["scores"]) == ["emb"] and sub["n_cells"] == 60 and sub["baseline"] is None


@pytest.mark.parametrize("case,expected", [
    ("no_batch_key", "obs has no column 'donor' (--batch-key)"),
    ("no_label_key", "obs has no column 'celltype' (--label-key)"),
    ("one_batch", "obs['one'] (--batch-key) has one batch ('b1'); integration metrics need at least two"),
    ("short_npy", "embedding 'short': shape (89, 4) does not match the data's 90 cells"),
    ("no_obsm", "obsm has no embedding 'X_performer'"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, case, expected):
    src = anndata.read_h5ad(files / "cells.h5ad")
    src.obs["one"] = "b1"
    src.write_h5ad(tmp_path / "in.h5ad")
    np.save(tmp_path / "short.npy", np.zeros((89, 4), np.float32))
    args = {"batch": "batch", "label": "cell_type", "emb": [str(tmp_path / "short.npy")]}
    if case == "no_batch_key":
        args["batch"] = "donor"
    elif case == "no_label_key":
        args["label"] = "celltype"
    elif case == "one_batch":
        args["batch"] = "one"
    elif case == "no_obsm":
        args["emb"] = ["X_performer"]
    out = tmp_path / "out"
    rc = main(["integrate", "--adata", str(tmp_path / "in.h5ad"), "--batch-key", args["batch"], "--label-key",
               args["label"], "--embedding", *args["emb"], "--out-dir", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not out.exists()


def test_the_baseline_needs_counts_or_says_how_to_skip_it():
    a = labelled(15)
    a.X = sp.csr_matrix(-np.abs(a.X.toarray()))
    a.obsm["X_e"] = np.random.default_rng(0).normal(size=(a.n_obs, 3))
    with pytest.raises(EvaluateError, match=r"negative values.*--no-baseline"):
        integrate(a, ["X_e"], "batch", "cell_type", verbose=False)
    assert list(integrate(a, ["X_e"], "batch", "cell_type", baseline=False, verbose=False).index) == ["X_e"]
