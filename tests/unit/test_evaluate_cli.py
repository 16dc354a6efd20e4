"""`python -m evaluate` subcommands in real subprocesses, and evaluate's import boundary."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scpretrain import scmodels
from scpretrain.evaluate.__main__ import build_parser, main
from scpretrain.scmodels.build import default_preprocessing
from tests.unit.test_evaluate_api import _one_thread  # noqa: F401  (autouse fixture)
from scpretrain.train.export import export_model, write_export

ROOT = Path(__file__).resolve().parents[2]
N_GENES = 50
VOCAB = [(f"ENSG{i:011d}", f"GENE{i}") for i in range(N_GENES)]
TYPES = ("B cell", "T cell", "monocyte")


def _adata(n_per_type: int, seed: int, genes: int = N_GENES) -> anndata.AnnData:
    """Integer counts, 15 marker genes per type at 20x background; var: versioned Ensembl ids + symbols."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.asarray(TYPES), n_per_type)
    rate = np.ones((len(labels), N_GENES))
    for t, name in enumerate(TYPES):
        rate[labels == name, 15 * t:15 * t + 15] = 20.0
    var = pd.DataFrame({"gene_symbols": [s for _, s in VOCAB]}, index=[f"{g}.2" for g, _ in VOCAB])
    obs = pd.DataFrame({"cell_type": labels}, index=[f"c{seed}_{i}" for i in range(len(labels))])
    x = sp.csr_matrix(rng.poisson(rate).astype(np.float32))
    return anndata.AnnData(x, obs=obs, var=var)[:, :genes].copy()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    export_model(d / "mae", scmodels.build_model("mae", dict(n_genes=N_GENES, hidden=[16], latent=8)),
                 default_preprocessing("mae"), VOCAB)
    perf = scmodels.build_model("performer", dict(n_genes=N_GENES, dim=16, depth=1, heads=2, dim_head=8,
                                                  nb_features=8))
    # cloned: export_model hands performer-pytorch's shared (aliased) tensors to safetensors, which refuses
    write_export(d / "performer", {k: v.clone() for k, v in perf.state_dict().items()}, "performer",
                 scmodels.build.hparams_of(perf), default_preprocessing("performer"), VOCAB)
    _adata(30, seed=1).write_h5ad(d / "ref.h5ad")
    _adata(8, seed=2).write_h5ad(d / "query.h5ad")
    _adata(5, seed=3, genes=20).write_h5ad(d / "narrow.h5ad")
    return d


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # one thread: tiny models, and a second thread only adds contention on a shared machine
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "evaluate", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_help_walks_a_new_user_through():
    text = build_parser().format_help()
    for word in ("embed", "finetune", "annotate", "knn", "report", "RAW COUNTS", "--layer", "examples:",
                 "scbert", "partial", "Unassigned"):
        assert word in text
    sub = build_parser()._subparsers._group_actions[0].choices
    assert "--threshold" in sub["annotate"].format_help() and "--out-dir" in sub["report"].format_help()
    for cmd in ("finetune", "annotate", "report"):
        assert all(f in sub[cmd].format_help() for f in ("--head", "--mode", "--unfreeze"))
    assert "--plots" in sub["annotate"].format_help() and "--max-distance" in sub["knn"].format_help()


def test_cli_embed(files):
    r = cli("embed", "--export", files / "mae", "--adata", files / "query.h5ad", "--out", files / "emb.h5ad")
    assert r.returncode == 0, r.stderr
    assert "50/50 export genes (100.0%) found in var_names by gene_id" in r.stdout
    assert anndata.read_h5ad(files / "emb.h5ad").obsm["X_mae"].shape == (24, 8)


def test_cli_annotate_with_unassigned(files):
    r = cli("annotate", "--export", files / "mae", "--reference", files / "ref.h5ad",
            "--label-key", "cell_type", "--query", files / "query.h5ad", "--out", files / "ann.h5ad",
            "--threshold", "0.999", "--head", "mlp")
    assert r.returncode == 0, r.stderr
    obs = anndata.read_h5ad(files / "ann.h5ad").obs
    prob = obs["predicted_cell_type_probability"].to_numpy()
    assert np.array_equal(obs["predicted_cell_type"].astype(str).to_numpy() == "Unassigned", prob < 0.999)
    assert "Unassigned" in r.stdout


def test_cli_knn(files):
    r = cli("knn", "--export", files / "mae", "--reference", files / "ref.h5ad", "--label-key", "cell_type",
            "--query", files / "query.h5ad", "--out", files / "knn.h5ad")
    assert r.returncode == 0, r.stderr
    obs = anndata.read_h5ad(files / "knn.h5ad").obs
    assert (obs["predicted_cell_type"].astype(str) == obs["cell_type"]).mean() > 0.8


def test_cli_finetune_then_annotate_with_the_saved_head(files):
    head = files / "head"
    r = cli("finetune", "--export", files / "mae", "--reference", files / "ref.h5ad",
            "--label-key", "cell_type", "--out", head)
    assert r.returncode == 0, r.stderr
    assert json.loads((head / "head.json").read_text())["classes"] == list(TYPES)
    # in-process (the subprocess path of annotate is covered above): the saved head, no reference
    assert main(["annotate", "--export", str(files / "mae"), "--load-head", str(head),
                 "--label-key", "cell_type", "--query", str(files / "query.h5ad"),
                 "--out", str(files / "ann2.h5ad"), "--quiet"]) == 0
    obs = anndata.read_h5ad(files / "ann2.h5ad").obs
    assert (obs["predicted_cell_type"].astype(str) == obs["cell_type"]).mean() > 0.8


def test_cli_report_prints_table_and_writes_files(files):
    out = files / "report"
    # --no-umap: a fresh process would spend its first seconds compiling umap-learn (covered in-process)
    r = cli("report", "--export", files / "mae", "--adata", files / "ref.h5ad", "--label-key", "cell_type",
            "--test-size", "0.3", "--seed", "0", "--out-dir", out, "--no-umap", "--mode", "frozen")
    assert r.returncode == 0, r.stderr
    for row in ("linear head on the frozen encoder (X_mae)", "kNN (k=5, cosine)", "logistic regression",
                "majority class"):
        assert row in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_test"] == 27 and rep["methods"]["head"]["accuracy"] > rep["methods"]["majority"]["accuracy"]
    assert (out / "confusion_matrix.png").stat().st_size > 0 and not (out / "umap.png").exists()


def test_cli_partial_finetune_saves_beside_the_export_then_annotates_with_plots(files, tmp_path):
    export = tmp_path / "mae"
    export.mkdir()
    for f in (files / "mae").iterdir():
        (export / f.name).write_bytes(f.read_bytes())
    args = ["--label-key", "cell_type", "--quiet"]
    assert main(["finetune", "--export", str(export), "--reference", str(files / "ref.h5ad"), *args,
                 "--head", "mlp", "--mode", "partial", "--unfreeze", "1", "--max-epochs", "5"]) == 0
    saved = export / "heads" / "cell_type-mlp-partial"  # the default --out: beside the export
    assert sorted(p.name for p in saved.iterdir()) == ["encoder.safetensors", "head.json", "head.safetensors"]
    assert json.loads((saved / "head.json").read_text())["fine_tuning"]["mode"] == "partial"
    assert main(["annotate", "--export", str(export), "--load-head", str(saved), *args,
                 "--query", str(files / "query.h5ad"), "--out", str(tmp_path / "ann.h5ad"),
                 "--plots", str(tmp_path / "fig")]) == 0
    ann = anndata.read_h5ad(tmp_path / "ann.h5ad")
    assert ann.obsm["X_mae_finetuned"].shape == ann.obsm["X_mae"].shape == (24, 8)
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["confusion_matrix.png", "umap.png"]
    # the same head on another export is refused in one line
    assert main(["annotate", "--export", str(files / "performer"), "--load-head", str(saved), *args,
                 "--query", str(files / "query.h5ad"), "--out", str(tmp_path / "x.h5ad")]) == 2


def test_cli_errors_are_one_line_and_exit_2(files, capsys):
    args = ["embed", "--export", str(files / "mae"), "--out", str(files / "x.h5ad"), "--quiet"]
    assert main([*args, "--adata", str(files / "narrow.h5ad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {files / 'narrow.h5ad'}: only 20/50 (40.0%)") and err.count("\n") == 1
    assert main([*args, "--adata", str(files / "nope.h5ad")]) == 2
    assert capsys.readouterr().err == f"error: {files / 'nope.h5ad'}: no such file; pass an existing .h5ad\n"
    assert main(["embed", "--export", str(files), "--adata", str(files / "query.h5ad"), "--out", "x"]) == 2
    assert "config.json: missing" in capsys.readouterr().err
    r = cli("annotate", "--export", files / "mae", "--label-key", "cell_type",
            "--query", files / "query.h5ad", "--out", files / "y.h5ad")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: annotate: pass --reference REF.h5ad (labelled cells) or --load-head HEAD_DIR"]


BOUNDARY_SCRIPT = textwrap.dedent("""
    import sys

    BLOCKED = ("deepspeed", "tiledbsoma", "zarr", "train")
    attempts = []

    def importer():
        f = sys._getframe(2)
        skip = ("importlib", "_frozen_importlib")
        while f is not None and f.f_globals.get("__name__", "").startswith(skip):
            f = f.f_back
        return f.f_globals.get("__name__", "") if f is not None else ""

    class Block:
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top == "scpretrain" and name.count("."):
                top = name.split(".")[1]  # scpretrain.train counts as train
            if top not in BLOCKED:
                return None
            who = importer()
            if top == "zarr" and who.partition(".")[0] in ("anndata", "zarr"):
                return None  # anndata cannot be imported without zarr; only evaluate's own imports count
            attempts.append((name, who))
            raise ImportError(f"{name} is blocked (imported by {who})")

    sys.meta_path.insert(0, Block())
    from scpretrain import evaluate
    models = {family: evaluate.load_export(sys.argv[1] + "/" + family) for family in ("mae", "performer")}
    # importing evaluate and loading exports touches neither anndata nor zarr at all
    assert not {"anndata", "zarr"} & {m.partition(".")[0] for m in sys.modules}, "anndata/zarr imported"
    import anndata
    for family, dim in (("mae", 8), ("performer", 16)):
        model = models[family]
        adata = anndata.read_h5ad(sys.argv[2])
        evaluate.embed(model, adata, verbose=False)
        assert adata.obsm["X_" + family].shape == (adata.n_obs, dim)
    evaluate.annotate(model, adata, anndata.read_h5ad(sys.argv[2]), "cell_type", verbose=False, max_epochs=3)
    loaded = sorted({m.partition(".")[0] for m in sys.modules} & {"deepspeed", "tiledbsoma", "train"})
    loaded += sorted(m for m in sys.modules if m.startswith(("scpretrain.train", "scpretrain.sharding")))
    assert not loaded and not attempts, (loaded, attempts)
    print("boundary ok")
""")


def test_evaluate_runs_without_deepspeed_tiledbsoma_zarr_or_train(files, tmp_path):
    script = tmp_path / "boundary.py"
    script.write_text(BOUNDARY_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(files), str(files / "query.h5ad")], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "boundary ok" in r.stdout, r.stderr[-3000:]
