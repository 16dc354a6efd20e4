"""Fine-tuning the encoder (frozen / partial / full), the scBERT head, saved classifiers, novel types,
pictures and the scanpy workflow on written embeddings."""
from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

from scpretrain import evaluate
from scpretrain import scmodels
from scpretrain.evaluate.align import align_to_vocab
from scpretrain.evaluate.annotate import UNASSIGNED
from scpretrain.evaluate.classifier import Classifier, trainable_names
from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.finetune import fit_classifier
from scpretrain.evaluate.heads import Head
from scpretrain.scmodels.build import default_preprocessing
from tests.unit.test_evaluate_api import _one_thread  # noqa: F401  (autouse fixture)
from tests.unit.test_evaluate_api import N_GENES, TYPES, VOCAB, make_adata, write
from scpretrain.train.export import export_model

PERFORMER_HP = dict(n_genes=N_GENES, dim=16, depth=2, heads=2, dim_head=8, nb_features=8)
MAE_HP = dict(n_genes=N_GENES, hidden=[16, 16], latent=8)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Random two-block exports of both families (the encoder's quality is not under test here)."""
    root = tmp_path_factory.mktemp("ft_exports")
    for fam, hp in (("mae", MAE_HP), ("performer", PERFORMER_HP)):
        torch.manual_seed(0)
        write(scmodels.build_model(fam, hp).eval(), root / fam)
    return root


def counts_of(adata: anndata.AnnData, model) -> sp.csr_matrix:
    return align_to_vocab(adata, model.vocab, verbose=False)[0]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- (d) the scBERT head ----------------------------------------------------------------------------

def test_scbert_head_shapes():
    head = Head(16, list(TYPES), kind="scbert", seq_len=N_GENES + 1)
    net = head.net
    assert (net.conv.in_channels, net.conv.out_channels, net.conv.kernel_size) == (16, 1, (1,))
    linears = [m for m in net.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(N_GENES + 1, 512), (512, 128), (128, 3)]
    assert [type(m).__name__ for m in net.mlp if not isinstance(m, torch.nn.Dropout)] == [
        "ReLU", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert head(torch.randn(4, N_GENES + 1, 16)).shape == (4, 3)
    with pytest.raises(EvaluateError, match=r"expects \[n, 51, 16\]"):
        head.predict_proba(np.zeros((2, 16), np.float32))
    with pytest.raises(EvaluateError, match="needs seq_len"):
        Head(16, list(TYPES), kind="scbert")


def test_scbert_head_reads_per_gene_representations_of_a_performer(exports):
    model = evaluate.load_export(exports / "performer")
    adata = make_adata(12, seed=1)
    clf = fit_classifier(model, counts_of(adata, model), adata.obs["cell_type"], "auto", max_epochs=3)
    assert clf.kind == "scbert" and clf.head.input_shape == (N_GENES + 1, 16)
    x = clf.inputs(counts_of(adata, model), slice(0, 5), torch.device("cpu"))
    assert clf.features(x).shape == (5, N_GENES + 1, 16)
    proba, emb = clf.predict(counts_of(adata, model), batch_size=7, device="cpu")
    assert proba.shape == (36, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    # the pooled embedding from the same pass is exactly what evaluate.embed writes
    direct = evaluate.embed(model, adata, batch_size=7, verbose=False).obsm["X_performer"]
    np.testing.assert_array_equal(emb, direct)
    with pytest.raises(EvaluateError, match="scbert head reads per-gene representations"):
        fit_classifier(evaluate.load_export(exports / "mae"), counts_of(adata, model), adata.obs["cell_type"],
                       "scbert")


# --- (c) what each mode trains ----------------------------------------------------------------------

EXPECTED_TRAINED = [
    # MAE blocks are the encoder's Linear layers (encoder.0, .3, .6 for hidden [16, 16])
    ("mae", "partial", 1, ("encoder.6.",)),
    ("mae", "partial", 2, ("encoder.3.", "encoder.6.")),
    ("mae", "full", 1, ("encoder.",)),
    # Performer blocks are performer.net.layers.<i>; partial adds the final norm, as scBERT
    ("performer", "partial", 1, ("performer.net.layers.1.", "norm.")),
    ("performer", "partial", [-2], ("performer.net.layers.0.", "norm.")),  # scBERT's literal layers[-2]
    ("performer", "full", 1, ("token_emb.", "performer.net.", "norm.")),  # gene_emb frozen by its config
]


@pytest.mark.parametrize("family,mode,unfreeze,prefixes", EXPECTED_TRAINED,
                         ids=[f"{f}-{m}-{u}" for f, m, u, _ in EXPECTED_TRAINED])
def test_finetuning_changes_only_the_parameters_it_should(exports, family, mode, unfreeze, prefixes):
    model = evaluate.load_export(exports / family)
    original = _state(model.module)
    adata = make_adata(10, seed=1)
    head = "linear" if family == "mae" else "scbert"
    clf = fit_classifier(model, counts_of(adata, model), adata.obs["cell_type"], head, mode, unfreeze,
                         max_epochs=2, patience=2, lr=1e-2, encoder_lr=1e-2)
    params = dict(clf.encoder.named_parameters())
    expected = {n for n in params if n.startswith(prefixes)}
    assert set(clf.tuned) == expected and expected
    tuned = clf.encoder.state_dict()
    for key, before in original.items():
        # state_dict keys include performer-pytorch's alias names; map each to its parameter
        same_tensor = [n for n in expected if tuned[key].data_ptr() == params[n].data_ptr()]
        if same_tensor:
            assert not torch.equal(tuned[key], before), f"{key} should have trained"
        else:
            assert torch.equal(tuned[key], before), f"{key} changed but {mode} freezes it"
    # the export's own module is never touched, and stays frozen
    assert all(torch.equal(model.module.state_dict()[k], v) for k, v in original.items())
    assert not any(p.requires_grad for p in model.module.parameters())
    assert clf.head.fine_tuning["encoder_tensors"] == clf.tuned


def test_frozen_mode_trains_no_encoder_tensor_and_shares_the_module(exports):
    model = evaluate.load_export(exports / "performer")
    original = _state(model.module)
    adata = make_adata(8, seed=1)
    clf = fit_classifier(model, counts_of(adata, model), adata.obs["cell_type"], "scbert", "frozen",
                         max_epochs=2)
    assert clf.encoder is model.module and clf.tuned == []
    assert all(torch.equal(model.module.state_dict()[k], v) for k, v in original.items())


def test_unfreeze_out_of_range_is_refused(exports):
    module = evaluate.load_export(exports / "mae").module
    with pytest.raises(EvaluateError, match=r"unfreeze=4: the mae encoder has 3 block\(s\)"):
        trainable_names(module, "partial", 4)
    with pytest.raises(EvaluateError, match="mode 'half'"):
        trainable_names(module, "half")


def test_finetuning_is_deterministic_under_a_seed(exports):
    model = evaluate.load_export(exports / "mae")
    adata = make_adata(10, seed=1)
    x, y = counts_of(adata, model), adata.obs["cell_type"]

    def run(seed):
        clf = fit_classifier(model, x, y, "mlp", "partial", 2, max_epochs=3, seed=seed)
        return {**{f"h.{k}": v for k, v in clf.head.state_dict().items()},
                **{n: p for n, p in clf.encoder.named_parameters() if n in clf.tuned}}

    a, b, c = run(3), run(3), run(4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --- saved classifiers ------------------------------------------------------------------------------

def test_finetuned_classifier_saves_beside_reloads_and_refuses_another_export(exports, tmp_path):
    model = evaluate.load_export(exports / "mae")
    ref, query = make_adata(20, seed=1), make_adata(6, seed=2)
    clf = evaluate.finetune(model, ref, "cell_type", "linear", mode="partial", unfreeze=1,
                            save_to=tmp_path / "h", max_epochs=5, verbose=False)
    assert isinstance(clf, Classifier)
    saved = load_file(tmp_path / "h" / "encoder.safetensors")
    assert sorted(saved) == ["encoder.6.bias", "encoder.6.weight"]  # only what trained
    cfg = json.loads((tmp_path / "h" / "head.json").read_text())
    assert cfg["fine_tuning"]["mode"] == "partial" and cfg["export"]["weights_sha256"] == model.weights_sha256

    in_memory, _ = clf.predict(counts_of(query, model))
    evaluate.annotate(model, query, None, "cell_type", head=tmp_path / "h", threshold=0.0, verbose=False)
    np.testing.assert_array_equal(query.obs["predicted_cell_type_probability"], in_memory.max(1))
    # the fine-tuned encoder's embedding beside the export's own
    assert query.obsm["X_mae_finetuned"].shape == query.obsm["X_mae"].shape == (18, 8)
    assert not np.array_equal(query.obsm["X_mae_finetuned"], query.obsm["X_mae"])
    np.testing.assert_array_equal(query.obsm["X_mae"],
                                  evaluate.embed(model, make_adata(6, seed=2), verbose=False).obsm["X_mae"])

    torch.manual_seed(1)
    export_model(tmp_path / "other", scmodels.build_model("mae", MAE_HP), default_preprocessing("mae"), VOCAB)
    with pytest.raises(EvaluateError, match="weights_sha256"):
        evaluate.annotate(tmp_path / "other", make_adata(2), None, "cell_type", head=tmp_path / "h",
                          verbose=False)
    save_file({k: v + 1 for k, v in saved.items()}, tmp_path / "h" / "encoder.safetensors")
    with pytest.raises(EvaluateError, match=r"encoder\.safetensors: sha256 does not match"):
        Classifier.load(tmp_path / "h", model)


def test_saved_scbert_head_with_full_finetuning_round_trips(exports, tmp_path):
    model = evaluate.load_export(exports / "performer")
    ref = make_adata(8, seed=1)
    clf = evaluate.finetune(model, ref, "cell_type", mode="full", save_to=tmp_path / "p", max_epochs=2,
                            verbose=False)
    back = Classifier.load(tmp_path / "p", evaluate.load_export(exports / "performer"))
    assert (back.kind, back.mode, back.tuned) == ("scbert", "full", clf.tuned)
    x = counts_of(make_adata(3, seed=5), model)
    np.testing.assert_array_equal(back.predict(x)[0], clf.predict(x)[0])


# --- (b) cell types absent from the reference -------------------------------------------------------

NOVEL = "plasma cell"


def _typed_counts(types: list[int], n_per_type: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """4 possible types over 60 genes, each with its own 15 marker genes at 20x background."""
    rng = np.random.default_rng(seed)
    names = (*TYPES, NOVEL)
    labels = np.repeat(np.asarray([names[t] for t in types]), n_per_type)
    rate = np.ones((len(labels), 60))
    for t in types:
        rate[labels == names[t], 15 * t:15 * t + 15] = 20.0
    return rng.poisson(rate).astype(np.float32), labels


def _pretrained_mae(out) -> None:
    """A tiny MAE pretrained (masked reconstruction, as in train/) on an atlas with all four types:
    the labelled reference lacks one of them, as a lab's reference lacks a type its atlas has."""
    vocab = [(f"ENSG{i:011d}", f"GENE{i}") for i in range(60)]
    x, _ = _typed_counts([0, 1, 2, 3], 100, seed=0)
    x = scmodels.preprocess(torch.from_numpy(x), default_preprocessing("mae"))
    torch.manual_seed(0)
    model = scmodels.build_model("mae", dict(n_genes=60, hidden=[32], latent=8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = x[torch.randint(0, len(x), (64,), generator=gen)]
        mask = torch.rand(batch.shape, generator=gen) < 0.5
        loss = ((model(batch * ~mask / 0.5) - batch) ** 2)[mask].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    export_model(out, model.eval(), default_preprocessing("mae"), vocab)


def _adata(x: np.ndarray, labels: np.ndarray) -> anndata.AnnData:
    var = pd.DataFrame(index=[f"GENE{i}" for i in range(x.shape[1])])
    obs = pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(len(labels))])
    return anndata.AnnData(sp.csr_matrix(x), obs=obs, var=var)


def test_cells_of_a_type_absent_from_the_reference_are_unassigned(tmp_path, capsys):
    _pretrained_mae(tmp_path / "mae")
    model = evaluate.load_export(tmp_path / "mae")
    reference = _adata(*_typed_counts([0, 1, 2], 40, seed=1))
    query = _adata(*_typed_counts([0, 1, 2, 3], 25, seed=2))
    novel = query.obs["cell_type"].to_numpy() == NOVEL

    rates = {}
    methods = {"knn": dict(head="knn"), "knn, every neighbour votes": dict(head="knn", max_distance=None),
               "linear head": dict(head="linear")}
    for name, kw in methods.items():
        evaluate.annotate(model, query, reference, "cell_type", verbose=False, **kw)
        pred = query.obs["predicted_cell_type"].astype(str).to_numpy()
        rates[name] = (float(np.mean(pred[novel] == UNASSIGNED)), float(np.mean(pred[~novel] == UNASSIGNED)),
                       float(np.mean(pred[~novel] == query.obs["cell_type"].to_numpy()[~novel])))
    with capsys.disabled():
        for name, (nov, known, acc) in rates.items():
            print(f"\n[novel type] {name}: {nov:.0%} of {novel.sum()} '{NOVEL}' cells Unassigned, "
                  f"{known:.0%} of {(~novel).sum()} known cells Unassigned, known accuracy {acc:.0%}")
    novel_rate, known_rate, known_acc = rates["knn"]
    assert novel_rate >= 0.8 and known_rate <= 0.2 and known_acc >= 0.8
    # for kNN the distance rule is what flags them: plain vote fractions do not
    assert rates["knn, every neighbour votes"][0] < novel_rate


# --- pictures and the scanpy workflow ---------------------------------------------------------------

def test_scanpy_neighbors_and_umap_run_on_an_embedding_written_by_embed(exports):
    import scanpy as sc

    adata = evaluate.embed(exports / "mae", make_adata(20, seed=3), verbose=False)
    sc.pp.neighbors(adata, use_rep="X_mae", n_neighbors=10)
    sc.tl.umap(adata, random_state=0)
    umap = adata.obsm["X_umap"]
    assert umap.shape == (60, 2) and np.isfinite(umap).all()
    assert adata.obsp["connectivities"].shape == (60, 60)


def test_annotate_draws_umap_and_confusion_matrix(exports, tmp_path):
    query = make_adata(10, seed=2)
    evaluate.annotate(exports / "mae", query, make_adata(20, seed=1), "cell_type", plot_dir=tmp_path / "fig",
                      verbose=False)
    for name in ("umap.png", "confusion_matrix.png"):
        assert (tmp_path / "fig" / name).read_bytes()[:8] == PNG
    assert set(query.uns["evaluate"]["files"]) == {"umap", "confusion_matrix"}
    # no true labels in the query: a UMAP coloured by prediction only, and no confusion matrix
    unlabelled = make_adata(10, seed=2)
    del unlabelled.obs["cell_type"]
    evaluate.annotate(exports / "mae", unlabelled, make_adata(20, seed=1), "cell_type", head="knn",
                      plot_dir=tmp_path / "fig2", verbose=False)
    assert sorted(p.name for p in (tmp_path / "fig2").iterdir()) == ["umap.png"]
