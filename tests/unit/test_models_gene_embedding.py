"""External gene embeddings: formats, alignment to the vocabulary, coverage, widths, freezing."""
import numpy as np
import pytest
import torch

from scpretrain.scmodels import build_model
from scpretrain.scmodels.performer import PerformerEncoder
from scpretrain.train import objectives
from scpretrain.train.config import load_config
from scpretrain.train.gene_embedding import align_names, fit_width, load_gene_embedding, read_embedding_file
from scpretrain.train.trainer import build_model_for

VOCAB = [("ENSG00000000001.3", "TP53"), ("ENSG00000000002", "CD3E"), ("ENSG00000000003", "MS4A1"),
         ("ENSG00000000004", "NEW1"), ("ENSG00000000005", "NEW2")]
TINY_P = dict(dim=8, depth=1, heads=2, dim_head=4, nb_features=4, feature_redraw_interval=0)


def write_w2v(path, rows, header=True):
    width = len(next(iter(rows.values())))
    lines = [f"{len(rows)} {width}"] if header else []
    lines += [f"{g} " + " ".join(repr(float(v)) for v in vec) for g, vec in rows.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def corpus(tmp_path):
    (tmp_path / "vocab.tsv").write_text("gene_id\tsymbol\n" + "".join(f"{g}\t{s}\n" for g, s in VOCAB))
    return tmp_path


def test_word2vec_text_by_symbol_with_coverage_and_seeded_fill(tmp_path):
    rows = {"CD3E": [1, 2, 3, 4], "TP53": [5, 6, 7, 8], "MS4A1": [0, 0, 1, 1], "NOT_IN_VOCAB": [9, 9, 9, 9]}
    f = write_w2v(tmp_path / "g2v.txt", rows)
    emb = load_gene_embedding(f, VOCAB, seed=3)
    assert emb.key == "symbol" and emb.matched == 3 and emb.coverage == pytest.approx(0.6)
    assert emb.weights.dtype == torch.float32 and emb.weights.shape == (5, 4)
    assert emb.weights[:3].tolist() == [[5, 6, 7, 8], [1, 2, 3, 4], [0, 0, 1, 1]]
    assert emb.missing == ["NEW1", "NEW2"]
    assert "3 of 5 vocabulary genes matched by symbol (60.0%)" in emb.report()
    again = load_gene_embedding(f, VOCAB, seed=3)
    assert torch.equal(emb.weights, again.weights)  # the random rows are a function of the seed
    other = load_gene_embedding(f, VOCAB, seed=4)
    assert not torch.equal(emb.weights[3:], other.weights[3:]) and torch.equal(emb.weights[:3], other.weights[:3])
    assert load_gene_embedding(write_w2v(tmp_path / "nohdr.txt", rows, header=False), VOCAB).matched == 3


def test_npy_with_gene_list_by_versioned_id_cast_from_float64(tmp_path):
    mat = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.save(tmp_path / "emb.npy", mat)
    (tmp_path / "emb.genes.txt").write_text("ENSG00000000003.9\nENSG00000000001\nENSG00000000099\n")
    names, m = read_embedding_file(tmp_path / "emb.npy")
    assert m.dtype == np.float32 and names[0] == "ENSG00000000003.9"
    emb = load_gene_embedding(tmp_path / "emb.npy", VOCAB)
    assert emb.key == "gene_id" and emb.matched == 2
    assert emb.weights[0].tolist() == [4, 5, 6, 7] and emb.weights[2].tolist() == [0, 1, 2, 3]


def test_align_prefers_the_key_that_matches_more():
    idx, key = align_names(["ENSG00000000002.1", "TP53", "ENSG00000000005"], VOCAB)
    assert key == "gene_id" and idx.tolist() == [-1, 0, -1, -1, 2]


def test_errors_name_the_file_and_the_fix(tmp_path):
    f = write_w2v(tmp_path / "mouse.txt", {"Trp53": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"mouse\.txt: none of its 1 gene names"):
        load_gene_embedding(f, VOCAB)
    np.save(tmp_path / "lonely.npy", np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"lonely\.npy: a \.npy table needs its row names"):
        load_gene_embedding(tmp_path / "lonely.npy", VOCAB)
    (tmp_path / "ragged.txt").write_text("A 1 2\nB 1\n")
    with pytest.raises(ValueError, match=r"ragged\.txt: line 2 has 1 values"):
        read_embedding_file(tmp_path / "ragged.txt")


def test_fit_width_is_a_fixed_seeded_projection():
    w = torch.randn(50, 32)
    a, b = fit_width(w, 8, seed=1), fit_width(w, 8, seed=1)
    assert a.shape == (50, 8) and torch.equal(a, b) and fit_width(w, 32) is w
    ratio = a.norm(dim=1) / w.norm(dim=1)  # approximately norm-preserving
    assert 0.4 < ratio.mean().item() < 1.6


def test_build_model_for_loads_gene2vec_frozen_and_it_stays_fixed(tmp_path):
    rows = {s: [float(i)] * 8 for i, (_, s) in enumerate(VOCAB[:4])}
    f = write_w2v(tmp_path / "g2v.txt", rows)
    cfg = load_config(None, ["model.family=performer", f"model.gene_embedding={f}", f"data.corpus={corpus(tmp_path)}",
                             *[f"model.params.{k}={v}" for k, v in TINY_P.items()], "model.params.freeze_gene_embedding=true"])
    model = build_model_for(cfg, len(VOCAB))
    assert isinstance(model, PerformerEncoder) and model.gene_proj is None
    assert model.gene_emb.weight[:4, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert model.gene_emb.weight[-1].abs().sum() == 0  # the appended position stays zero
    before = model.gene_emb.weight.detach().clone()
    tok = torch.randint(0, 6, (4, 6))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss, _ = objectives.performer_masked_bins(model, tok, tok[:, :5] > 0, torch.Generator().manual_seed(0), 0.9, 0.0)
    loss.backward()
    opt.step()
    assert model.gene_emb.weight.grad is None and torch.equal(before, model.gene_emb.weight)


@pytest.mark.parametrize("projection", ["random", "learned"])
def test_wider_file_projected_randomly_or_by_a_learned_linear(tmp_path, projection):
    rows = {s: list(np.linspace(0, 1, 24) * (i + 1)) for i, (_, s) in enumerate(VOCAB)}  # GenePT-like: 24 > dim 8
    f = write_w2v(tmp_path / "genept.txt", rows)
    cfg = load_config(None, ["model.family=performer", f"model.gene_embedding={f}", f"data.corpus={corpus(tmp_path)}",
                             f"model.gene_embedding_projection={projection}",
                             *[f"model.params.{k}={v}" for k, v in TINY_P.items()]])
    model = build_model_for(cfg, len(VOCAB))
    tok = torch.randint(0, 6, (3, 6))
    assert model(tok).shape == (3, 6, 7)
    if projection == "random":
        assert model.gene_emb.weight.shape == (6, 8) and model.gene_proj is None
        assert torch.allclose(model.gene_emb.weight[:5], fit_width(torch.tensor(list(rows.values()), dtype=torch.float32), 8))
    else:
        assert model.cfg.gene_embedding_dim == 24 and model.gene_emb.weight.shape == (6, 24)
        assert model.gene_emb.weight.requires_grad is False and model.gene_proj.weight.requires_grad
        model(tok).sum().backward()
        assert model.gene_proj.weight.grad is not None and model.gene_emb.weight.grad is None
        assert model.gene_identity()[-1].abs().sum() == 0  # bias-free: the pad row stays zero
        rebuilt = build_model("performer", {**TINY_P, "n_genes": 5, "gene_embedding_dim": 24})  # as evaluate does
        rebuilt.load_state_dict(model.state_dict())


def test_gene_embedding_refused_for_the_mae(tmp_path):
    f = write_w2v(tmp_path / "g2v.txt", {"TP53": [1.0, 2.0]})
    cfg = load_config(None, ["model.family=mae", f"model.gene_embedding={f}", f"data.corpus={corpus(tmp_path)}"])
    with pytest.raises(ValueError, match=r"model\.gene_embedding: only the performer family"):
        build_model_for(cfg, len(VOCAB))
