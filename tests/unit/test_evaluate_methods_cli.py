"""The documented CLI paths of issue 8's methods: finetune --loss/--hard-mining, genept, langcell."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata
import numpy as np
import pytest

from scpretrain.evaluate.__main__ import build_parser, main
from scpretrain.evaluate.vectors import write_vectors
from tests.unit.test_evaluate_api import _one_thread  # noqa: F401  (autouse fixture)
from tests.unit.test_evaluate_api import TYPES, VOCAB, make_adata, make_model, write

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("methods_cli")
    write(make_model("mae"), d / "mae")
    make_adata(30, seed=1).write_h5ad(d / "ref.h5ad")
    make_adata(8, seed=2).write_h5ad(d / "query.h5ad")
    rng = np.random.default_rng(0)
    write_vectors(d / "genes.tsv", [s for _, s in VOCAB], rng.normal(size=(len(VOCAB), 16)))
    write_vectors(d / "labels.tsv", [*TYPES, "NK cell"], rng.normal(size=(4, 12)))
    return d


def test_help_documents_the_three_methods():
    text = build_parser().format_help()
    for word in ("genept", "langcell", "--loss gaussian_inflation --hard-mining", "--gene-embeddings",
                 "--label-embeddings"):
        assert word in text
    sub = build_parser()._subparsers._group_actions[0].choices
    for cmd in ("finetune", "annotate", "report"):
        assert all(f in sub[cmd].format_help() for f in ("--loss", "--hard-mining", "--inflation-sigma"))
    assert "--sentence-model" in sub["langcell"].format_help() and "--weights" in sub["genept"].format_help()


def test_cli_finetune_with_gaussian_inflation_and_hard_mining(files, tmp_path):
    assert main(["finetune", "--export", str(files / "mae"), "--reference", str(files / "ref.h5ad"),
                 "--label-key", "cell_type", "--out", str(tmp_path / "h"), "--loss", "gaussian_inflation",
                 "--hard-mining", "--hard-margin", "0.5", "--max-epochs", "5", "--quiet"]) == 0
    training = json.loads((tmp_path / "h" / "head.json").read_text())["training"]
    assert training["longtail"] == {"loss": "gaussian_inflation", "inflation_sigma": None,
                                    "inflation_gamma": 0.0, "hard_mining": True, "hard_margin": 0.5,
                                    "hard_weight": 4.0, "hard_lr_scale": 0.3}
    assert "n_hard" in training["hard_mining"]


def test_cli_genept_embeds_and_labels_without_an_export(files, tmp_path, capsys):
    genes, ref, query = (str(files / f) for f in ("genes.tsv", "ref.h5ad", "query.h5ad"))
    assert main(["genept", "--gene-embeddings", genes, "--query", query,
                 "--out", str(tmp_path / "emb.h5ad")]) == 0
    assert "50 of the data's 50 genes (100.0%) have an embedding" in capsys.readouterr().out
    assert anndata.read_h5ad(tmp_path / "emb.h5ad").obsm["X_genept"].shape == (24, 16)
    assert main(["genept", "--gene-embeddings", genes, "--reference", ref, "--label-key", "cell_type",
                 "--query", query, "--out", str(tmp_path / "knn.h5ad"), "--quiet"]) == 0
    obs = anndata.read_h5ad(tmp_path / "knn.h5ad").obs
    assert (obs["predicted_cell_type"].astype(str) == obs["cell_type"]).mean() > 0.9
    assert main(["genept", "--gene-embeddings", genes, "--reference", ref, "--query", query,
                 "--out", str(tmp_path / "x.h5ad")]) == 2
    assert "--reference needs --label-key" in capsys.readouterr().err


def test_cli_langcell_zero_shot_with_a_label_file_then_a_saved_head(files, tmp_path, capsys):
    args = ["langcell", "--export", str(files / "mae"), "--label-key", "cell_type", "--query",
            str(files / "query.h5ad"), "--label-embeddings", str(files / "labels.tsv"), "--max-epochs", "5"]
    assert main([*args, "--reference", str(files / "ref.h5ad"), "--out", str(tmp_path / "zs.h5ad"),
                 "--save-head", str(tmp_path / "lc")]) == 0
    assert "against 4 label texts (1 never seen in training: NK cell)" in capsys.readouterr().out
    first = anndata.read_h5ad(tmp_path / "zs.h5ad")
    assert list(first.uns["evaluate"]["candidates"]) == [*TYPES, "NK cell"]
    assert main([*args, "--load-head", str(tmp_path / "lc"), "--out", str(tmp_path / "zs2.h5ad"),
                 "--candidates", "B cell;NK cell", "--quiet"]) == 0
    assert set(anndata.read_h5ad(tmp_path / "zs2.h5ad").obs["predicted_cell_type"].astype(str)) <= {
        "B cell", "NK cell"}
    no_text = ["langcell", "--export", str(files / "mae"), "--label-key", "cell_type", "--reference",
               str(files / "ref.h5ad"), "--query", str(files / "query.h5ad"), "--out",
               str(tmp_path / "n.h5ad")]
    assert main(no_text) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LangCell needs label text embeddings") and "--sentence-model" in err


BOUNDARY = textwrap.dedent("""
    import sys
    import scpretrain.evaluate.__main__, scpretrain.evaluate.genept, scpretrain.evaluate.langcell
    import scpretrain.evaluate.longtail, scpretrain.evaluate.vectors, scpretrain.evaluate.integrate
    import scpretrain.evaluate.text
    bad = {m.partition(".")[0] for m in sys.modules} & {"deepspeed", "tiledbsoma", "zarr", "train",
                                                         "sentence_transformers", "jax", "scib_metrics"}
    bad |= {m for m in sys.modules if m.startswith(("scpretrain.train", "scpretrain.sharding", "scpretrain.launch"))}
    assert not bad, bad
    print("boundary ok")
""")


def test_new_modules_import_neither_training_code_nor_a_text_model():
    r = subprocess.run([sys.executable, "-c", BOUNDARY], env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "boundary ok" in r.stdout, r.stderr[-2000:]
