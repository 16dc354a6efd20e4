"""evaluate's Python API on real exports of small random models (written by train.export)."""
from __future__ import annotations

import json
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

from scpretrain import evaluate
from scpretrain import scmodels
from scpretrain.evaluate.align import align_to_vocab, strip_version
from scpretrain.evaluate.annotate import UNASSIGNED, knn_proba
from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.finetune import fit_head, stratified_split
from scpretrain.evaluate.heads import Head
from scpretrain.evaluate.metrics import classification_metrics
from scpretrain.scmodels.build import default_preprocessing
from scpretrain.train.export import export_model, write_export

N_GENES = 50
VOCAB = [(f"ENSG{i:011d}", f"GENE{i}") for i in range(N_GENES)]
TYPES = ("B cell", "T cell", "monocyte")
MAE_HP = dict(n_genes=N_GENES, hidden=[16], latent=8)
PERFORMER_HP = dict(n_genes=N_GENES, dim=16, depth=1, heads=2, dim_head=8, nb_features=8)


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return scmodels.build_model(family, MAE_HP if family == "mae" else PERFORMER_HP).eval()


def write(model: torch.nn.Module, out) -> None:
    if model.family == "performer":
        # export_model hands safetensors the state dict as is, and performer-pytorch keeps a second
        # reference to its layers (proj_updater), so save_file refuses the shared tensors; clone them.
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        hparams = scmodels.build.hparams_of(model)
        write_export(out, sd, "performer", hparams, default_preprocessing("performer"), VOCAB)
    else:
        export_model(out, model, default_preprocessing("mae"), VOCAB)


def make_counts(n_per_type: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer counts [cells, 50]: each type expresses its own 15 marker genes 20x above background."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.asarray(TYPES), n_per_type)
    rate = np.ones((len(labels), N_GENES))
    for t, name in enumerate(TYPES):
        rate[labels == name, 15 * t:15 * t + 15] = 20.0
    return rng.poisson(rate).astype(np.float32), labels


def make_adata(n_per_type: int = 30, seed: int = 0, var_names: str = "symbol") -> anndata.AnnData:
    x, labels = make_counts(n_per_type, seed)
    ids = [g for g, _ in VOCAB] if var_names == "id" else [s for _, s in VOCAB]
    obs = pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(len(labels))])
    return anndata.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=ids))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second torch thread only adds contention on a shared machine (5x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    models = {fam: make_model(fam) for fam in ("mae", "performer")}
    for fam, m in models.items():
        write(m, root / fam)
    return root, models


# --- loading and embedding -------------------------------------------------------------------------

@pytest.mark.parametrize("family,dim", [("mae", 8), ("performer", 16)])
def test_load_and_embed_match_the_model(exports, family, dim):
    root, models = exports
    model = evaluate.load_export(root / family)
    assert model.family == family and not model.module.training and model.n_genes == N_GENES
    assert all(not p.requires_grad for p in model.module.parameters())
    adata = make_adata(4)
    assert evaluate.embed(model, adata, batch_size=5, verbose=False) is adata
    emb = adata.obsm[f"X_{family}"]
    assert emb.shape == (12, dim) and emb.dtype == np.float32
    spec = scmodels.PreprocessSpec.from_dict(model.config["preprocessing"])
    with torch.no_grad():
        direct = models[family].encode(scmodels.preprocess(torch.from_numpy(adata.X.toarray()), spec))
    np.testing.assert_allclose(emb, direct.numpy(), rtol=1e-5, atol=1e-5)
    assert adata.uns["evaluate"]["coverage"]["fraction"] == 1.0


def test_performer_export_with_aliases_stored_once_loads(exports, tmp_path):
    # A writer that drops performer-pytorch's duplicate keys (safetensors' save_model does) stays loadable.
    root, _ = exports
    out = tmp_path / "dedup"
    out.mkdir()
    for name in ("config.json", "vocab.tsv"):
        (out / name).write_text((root / "performer" / name).read_text())
    sd = load_file(root / "performer" / "model.safetensors")
    save_file({k: v for k, v in sd.items() if ".proj_updater.instance." not in k}, out / "model.safetensors")
    a, b = make_adata(3), make_adata(3)
    evaluate.embed(root / "performer", a, verbose=False)
    evaluate.embed(out, b, verbose=False)
    np.testing.assert_array_equal(a.obsm["X_performer"], b.obsm["X_performer"])


def _copy_export(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_vocab_hash_mismatch_is_refused(exports, tmp_path):
    d = _copy_export(exports[0] / "mae", tmp_path / "bad")
    lines = (d / "vocab.tsv").read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # same genes, another column order: embeddings would be wrong
    (d / "vocab.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(EvaluateError, match=r"vocab\.tsv: sha256 .* 'vocab_sha256'"):
        evaluate.load_export(d)


@pytest.mark.parametrize("edit,match", [
    (lambda cfg, d: cfg.pop("n_genes"), r"config\.json: field 'n_genes' is missing"),
    (lambda cfg, d: cfg.update(model_family="gpt"), r"field 'model_family' is 'gpt'"),
    (lambda cfg, d: cfg["model"].update(latent=4), r"model\.safetensors: tensor .* has shape"),
    (lambda cfg, d: (d / "model.safetensors").unlink(), r"model\.safetensors: missing"),
])
def test_broken_exports_are_refused_naming_file_and_field(exports, tmp_path, edit, match):
    d = _copy_export(exports[0] / "mae", tmp_path / "bad")
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg, d)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EvaluateError, match=match):
        evaluate.load_export(d)


def test_state_dict_keys_are_checked_strictly(exports, tmp_path):
    d = _copy_export(exports[0] / "mae", tmp_path / "bad")
    sd = load_file(d / "model.safetensors")
    save_file({**sd, "extra.weight": torch.zeros(2)}, d / "model.safetensors")
    with pytest.raises(EvaluateError, match=r"does not have, e\.g\. \['extra\.weight'\]"):
        evaluate.load_export(d)
    sd.pop("encoder.0.bias")
    save_file(sd, d / "model.safetensors")
    with pytest.raises(EvaluateError, match=r"missing, e\.g\. \['encoder\.0\.bias'\]"):
        evaluate.load_export(d)


# --- gene alignment ---------------------------------------------------------------------------------

def test_strip_version_only_touches_ensembl_ids():
    assert strip_version("ENSG00000141510.17") == "ENSG00000141510"
    assert strip_version("ENSMUSG00000020122.3") == "ENSMUSG00000020122"
    assert strip_version("AC000061.1") == "AC000061.1"
    assert strip_version("TP53") == "TP53"


def test_align_by_symbol_reorders_and_zero_fills(capsys):
    # data genes: vocab genes 5, 0, 3 (symbols) plus one gene the model does not know
    x = np.array([[1, 2, 3, 4], [5, 0, 7, 8]], dtype=np.float32)
    adata = anndata.AnnData(x, var=pd.DataFrame(index=["GENE5", "GENE0", "MT-XYZ", "GENE3"]))
    vocab = VOCAB[:6]
    out, cov = align_to_vocab(adata, vocab, min_coverage=0.5)
    expected = np.array([[2, 0, 0, 4, 0, 1], [0, 0, 0, 8, 0, 5]], dtype=np.float32)
    np.testing.assert_array_equal(out.toarray(), expected)
    assert (cov.n_matched, cov.source, cov.matched_by) == (3, "var_names", "symbol")
    assert "3/6 export genes (50.0%)" in capsys.readouterr().out


def test_align_by_versioned_ensembl_column_beats_partial_symbols():
    x = sp.csr_matrix(np.arange(12, dtype=np.float32).reshape(3, 4))
    var = pd.DataFrame({"gene_ids": [f"{VOCAB[i][0]}.{i + 1}" for i in (3, 2, 1, 0)],
                        "gene_symbols": ["GENE3", "x", "y", "z"]}, index=["GENE3", "a", "b", "c"])
    out, cov = align_to_vocab(anndata.AnnData(x, var=var), VOCAB[:4], verbose=False)
    assert (cov.source, cov.matched_by, cov.n_matched) == ("var['gene_ids']", "gene_id", 4)
    np.testing.assert_array_equal(out.toarray(), x.toarray()[:, ::-1])


def test_below_min_coverage_is_refused_with_the_coverage():
    adata = make_adata(2)[:, :20].copy()
    with pytest.raises(EvaluateError, match=r"only 20/50 \(40\.0%\) of the export's genes"):
        align_to_vocab(adata, VOCAB, verbose=False)
    _, cov = align_to_vocab(adata, VOCAB, min_coverage=0.4, verbose=False)
    assert cov.fraction == 0.4


def test_counts_found_in_a_layer_and_negative_values_refused():
    adata = make_adata(2)
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.toarray() - 1.0  # e.g. scaled data in X
    out, _ = align_to_vocab(adata, VOCAB, verbose=False)  # X holds no counts: layers['counts'] is taken
    np.testing.assert_array_equal(out.toarray(), adata.layers["counts"].toarray())
    del adata.layers["counts"]
    with pytest.raises(EvaluateError, match=r"no raw counts found \(X: .* negative values.*--layer"):
        align_to_vocab(adata, VOCAB, verbose=False)
    fractional = anndata.AnnData(np.full((2, 50), 0.5, np.float32), var=adata.var)
    with pytest.raises(EvaluateError, match=r"non-integer values \(e\.g\. 0\.5"):
        align_to_vocab(fractional, VOCAB, verbose=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out, _ = align_to_vocab(fractional, VOCAB, verbose=False, allow_normalized=True)
    assert any("used as it is" in str(x.message) for x in w) and out.data.max() == 0.5


def test_counts_from_raw_like_a_scanpy_object(exports):
    # the usual scanpy layout: raw counts kept in .raw, X log-normalized and subset to a few genes
    counts = make_adata(3)
    adata = counts[:, :10].copy()
    adata.raw = counts
    adata.X = np.log1p(adata.X.toarray())
    evaluate.embed(exports[0] / "mae", adata, verbose=False)  # not counts in X: raw.X is found and taken
    np.testing.assert_array_equal(adata.obsm["X_mae"],
                                  evaluate.embed(exports[0] / "mae", counts.copy(), verbose=False).obsm["X_mae"])
    evaluate.embed(exports[0] / "mae", adata, layer="raw", verbose=False)
    reference = evaluate.embed(exports[0] / "mae", counts, verbose=False).obsm["X_mae"]
    np.testing.assert_array_equal(adata.obsm["X_mae"], reference)


# --- heads, annotation, kNN, report ----------------------------------------------------------------

def test_stratified_split_exact_sizes_and_seeded():
    labels = np.array(["a"] * 10 + ["b"] * 3 + ["c"])
    kept, held = stratified_split(labels, 0.3, seed=1)
    # a: round(3.0); b: max(round(0.9), 1); the singleton c stays on the kept side
    assert sorted(labels[held].tolist()) == ["a"] * 3 + ["b"]
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == 14
    assert np.array_equal(held, stratified_split(labels, 0.3, seed=1)[1])
    assert not np.array_equal(held, stratified_split(labels, 0.3, seed=2)[1])


def test_knn_votes_by_cosine():
    ref = np.array([[1, 0], [2, 0.1], [1, 0.2], [0, 1], [0.1, 3]], dtype=np.float32)
    labels = np.array(["x", "x", "y", "y", "y"])
    proba, classes = knn_proba(ref, labels, np.array([[5, 0.1], [0, 2]], dtype=np.float32), k=3)
    assert classes == ["x", "y"]
    np.testing.assert_allclose(proba, [[2 / 3, 1 / 3], [0, 1]], rtol=1e-6)


def test_metrics_count_unassigned_as_wrong():
    m = classification_metrics(["a", "a", "b", "b"], ["a", UNASSIGNED, "b", "a"])
    assert m["accuracy"] == 0.5
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["recall"] == 0.5 and m["per_class"]["b"]["precision"] == 1.0
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_is_seeded_and_reloads_identically(tmp_path, kind):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(90, 8)).astype(np.float32) + np.repeat(np.eye(3, 8) * 4, 30, axis=0)
    labels = np.repeat(np.asarray(TYPES), 30)
    h1 = fit_head(emb, labels, kind, seed=3, max_epochs=60)
    h2 = fit_head(emb, labels, kind, seed=3, max_epochs=60)
    assert all(torch.equal(a, b) for a, b in zip(h1.state_dict().values(), h2.state_dict().values()))
    h1.save(tmp_path / "head")
    assert json.loads((tmp_path / "head" / "head.json").read_text())["classes"] == list(TYPES)
    back = Head.load(tmp_path / "head")
    assert back.kind == kind and back.classes == list(TYPES)
    np.testing.assert_array_equal(back.predict_proba(emb), h1.predict_proba(emb))
    assert (back.predict_proba(emb).argmax(1) == np.repeat(np.arange(3), 30)).mean() > 0.9


def test_annotate_writes_columns_and_unassigned(exports, tmp_path):
    model = evaluate.load_export(exports[0] / "mae")
    ref, query = make_adata(40, seed=1), make_adata(10, seed=2)
    evaluate.annotate(model, query, ref, "cell_type", threshold=0.0, save_head=tmp_path / "h", verbose=False)
    pred, prob = query.obs["predicted_cell_type"], query.obs["predicted_cell_type_probability"]
    assert (pred.astype(str) == query.obs["cell_type"]).mean() > 0.9
    assert UNASSIGNED in pred.cat.categories and query.obsm["X_mae"].shape == (30, 8)
    cut = float(np.median(prob))
    again = make_adata(10, seed=2)
    evaluate.annotate(model, again, None, "cell_type", threshold=cut, head=tmp_path / "h", verbose=False)
    # the reloaded head gives the same numbers as the one trained in memory
    np.testing.assert_array_equal(again.obs["predicted_cell_type_probability"], prob)
    low = again.obs["predicted_cell_type_probability"].to_numpy() < cut
    assert low.any() and not low.all()
    assert (again.obs["predicted_cell_type"][low] == UNASSIGNED).all()
    assert (again.obs["predicted_cell_type"][~low].astype(str) == pred[~low].astype(str)).all()


def test_saved_head_refuses_another_export(exports, tmp_path):
    root, _ = exports
    evaluate.finetune(root / "mae", make_adata(10), "cell_type", save_to=tmp_path / "h", max_epochs=5,
                      verbose=False)
    write(make_model("mae", seed=1), tmp_path / "other")
    with pytest.raises(EvaluateError, match="weights_sha256"):
        evaluate.annotate(tmp_path / "other", make_adata(2), None, "cell_type", head=tmp_path / "h",
                          verbose=False)


@pytest.mark.parametrize("family", ["mae", "performer"])
def test_knn_annotation_needs_no_training(exports, family):
    query = make_adata(10, seed=2)
    evaluate.annotate(exports[0] / family, query, make_adata(20, seed=1), "cell_type", head="knn",
                      verbose=False)
    prob = query.obs["predicted_cell_type_probability"].to_numpy()
    pred = query.obs["predicted_cell_type"].astype(str).to_numpy()
    np.testing.assert_allclose(prob * 5, np.round(prob * 5), atol=1e-5)  # vote fractions of 5 neighbours
    info = query.uns["evaluate"]
    assert info["calibration"]["method"] == "leave-one-out reference cells"  # 60 reference cells, each left out
    assert info["calibration"]["n_cells"] == 60 and info["calibration"]["heldout_reject_rate"] <= 0.05
    assert np.array_equal(pred == UNASSIGNED, prob < info["threshold"])
    if family == "mae":  # a random Performer's mean-pooled embedding barely sees which genes are high
        assert (pred == query.obs["cell_type"].to_numpy()).mean() > 0.8


def test_report_beats_majority_and_writes_files(exports, tmp_path):
    adata = make_adata(30, seed=4)
    adata.obs.loc[adata.obs_names[:3], "cell_type"] = np.nan  # unlabelled cells are left out
    rep = evaluate.report(exports[0] / "mae", adata, "cell_type", out_dir=tmp_path, verbose=False)
    assert (rep["n_cells"], rep["n_test"]) == (87, 26)
    methods = rep["methods"]
    assert methods["majority"]["accuracy"] == pytest.approx(9 / 26)
    for name in ("head", "knn", "logreg"):
        assert methods[name]["accuracy"] > 0.8 and methods[name]["macro_f1"] > methods["majority"]["macro_f1"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["methods"]["head"]["accuracy"] == methods["head"]["accuracy"]
    assert on_disk["head"] == "linear" and on_disk["mode"] == "frozen"  # "auto" on an MAE export
    for name in ("confusion_matrix.png", "umap.png"):  # umap.png: held-out cells, true label vs. prediction
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(on_disk["files"]) == {"report", "confusion_matrix", "umap"}
