"""`python -m evaluate interpret`: top genes per cell type on cells whose markers are known by construction."""
from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scpretrain import scmodels
from scpretrain.evaluate.__main__ import main as evaluate_main
from scpretrain.scmodels.build import default_preprocessing
from scpretrain.train.export import export_model, write_export

N_GENES, TYPES, MARKERS = 200, ["alpha", "beta", "gamma"], 5
VOCAB = [(f"ENSG{i:011d}", f"G{i}") for i in range(N_GENES)]


def marker_cells(n_per_type: int = 60, seed: int = 0) -> anndata.AnnData:
    """Background counts everywhere; type t expresses genes 10t .. 10t+4 about twenty times higher."""
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.7, size=(n_per_type * len(TYPES), N_GENES)).astype(np.float32)
    labels = np.repeat(TYPES, n_per_type)
    for t in range(len(TYPES)):
        rows = labels == TYPES[t]
        x[np.ix_(rows, range(10 * t, 10 * t + MARKERS))] += rng.poisson(20, size=(rows.sum(), MARKERS))
    ad = anndata.AnnData(sp.csr_matrix(x), obs=pd.DataFrame({"cell_type": labels}))
    ad.obs_names = [f"c{i}" for i in range(ad.n_obs)]
    ad.var_names = [s for _, s in VOCAB]
    return ad


def test_interpret_ranks_the_constructed_markers_first(tmp_path, capsys):
    """The MAE export (random weights: a wide random map keeps each type's direction on its markers) must put
    every constructed marker in its type's top 20; the Performer path runs through the same command and
    writes the same tables (a random Performer's final LayerNorm can turn a type's markers negative, so its
    ranks are not asserted)."""
    torch.manual_seed(0)
    export_model(tmp_path / "mae", scmodels.build_model("mae", dict(n_genes=N_GENES, hidden=[256], latent=64)),
                 default_preprocessing("mae"), VOCAB)
    perf = scmodels.build_model("performer", dict(n_genes=N_GENES, dim=64, depth=1, heads=4, dim_head=16,
                                                  nb_features=16))
    write_export(tmp_path / "performer", {k: v.clone() for k, v in perf.state_dict().items()}, "performer",
                 scmodels.build.hparams_of(perf), default_preprocessing("performer"), VOCAB)
    marker_cells().write_h5ad(tmp_path / "cells.h5ad")
    spec = ";".join(f"{t}=" + ",".join(f"G{10 * i + j}" for j in range(MARKERS)) for i, t in enumerate(TYPES))
    for family in ("mae", "performer"):
        out = tmp_path / f"out-{family}"
        assert evaluate_main(["interpret", "--export", str(tmp_path / family), "--adata", str(tmp_path / "cells.h5ad"),
                              "--label-key", "cell_type", "--markers", spec, "--out-dir", str(out), "--quiet"]) == 0
        table = pd.read_csv(out / "top_genes.tsv", sep="\t")
        assert list(table.columns) == ["cell_type", "rank", "gene_id", "symbol", "attribution"]
        assert table.groupby("cell_type").size().to_dict() == {t: 20 for t in TYPES}
        ranks = pd.read_csv(out / "marker_ranks.tsv", sep="\t")
        assert len(ranks) == 15 and ranks["rank"].between(1, N_GENES).all() and (ranks["of_genes"] == N_GENES).all()
        if family == "mae":
            for i, t in enumerate(TYPES):
                top = set(table[table.cell_type == t].symbol)
                assert {f"G{10 * i + j}" for j in range(MARKERS)} <= top, (family, t, sorted(top))
            assert ranks["rank"].max() <= 20
        assert (out / "top_genes.png").stat().st_size > 1000
        assert "marker" in capsys.readouterr().out


def test_interpret_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    torch.manual_seed(0)
    export_model(tmp_path / "mae", scmodels.build_model("mae", dict(n_genes=N_GENES, hidden=[8], latent=4)),
                 default_preprocessing("mae"), VOCAB)
    marker_cells(10).write_h5ad(tmp_path / "cells.h5ad")
    cases = [(["--label-key", "celltype"], "celltype"), (["--label-key", "cell_type", "--markers", "alpha:G0"],
                                                         "is not 'TYPE=GENE,GENE'"),
             (["--label-key", "cell_type", "--markers", "delta=G0"], "cell type 'delta' is not among the labels")]
    for extra, expected in cases:
        out = tmp_path / "out"
        assert evaluate_main(["interpret", "--export", str(tmp_path / "mae"), "--adata", str(tmp_path / "cells.h5ad"),
                              *extra, "--out-dir", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err
        assert not out.exists()
