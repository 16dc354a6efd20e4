"""FLOPs per cell against torch's FlopCounterMode; gradient x input attribution and top genes per type."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scpretrain.scmodels import PreprocessSpec, build_model, preprocess
from scpretrain.train import flops
from scpretrain.evaluate.interpret import gene_attributions, top_genes_per_type

TINY = {
    "mae": dict(n_genes=300, hidden=[64, 32], latent=16, dropout=0.0),
    "performer": dict(n_genes=300, dim=32, depth=2, heads=2, dim_head=16, nb_features=24, feature_redraw_interval=0),
}


def measured(model, x, backward: bool) -> float:
    with FlopCounterMode(display=False) as fc:
        out = model(x)
        if backward:
            out.float().sum().backward()
    return fc.get_total_flops() / x.shape[0]


@pytest.mark.parametrize("family", ["mae", "performer"])
def test_analytic_flops_match_flop_counter(family):
    torch.manual_seed(0)
    model = build_model(family, TINY[family])
    x = torch.rand(4, 300) if family == "mae" else torch.randint(0, 7, (4, 301))
    f = flops.flops_per_cell(family, TINY[family])
    assert math.isclose(f.forward, measured(model, x, False), rel_tol=0.10)
    assert math.isclose(f.train, measured(model, x, True), rel_tol=0.10)
    assert 2.0 < f.train / f.forward <= 3.0


def test_base_presets_flops_scale():
    from scpretrain.train.config import ModelConfig, resolve_model_params

    mae = flops.flops_per_cell("mae", {**resolve_model_params(ModelConfig("mae", "mae_base")), "n_genes": 19331})
    assert 0.9e8 < mae.train < 1.2e8  # the card: about 1e8 FLOPs forward+backward per cell
    bert = flops.flops_per_cell("performer", {**resolve_model_params(ModelConfig("performer", "scbert_base")),
                                              "n_genes": 16906})
    assert 2e11 < bert.forward < 4e11  # compute-bound: ~7,000x the MAE per cell


def test_flops_cli(capsys):
    flops.main(["--preset", "mae_tiny", "--n-genes", "300"])
    out = capsys.readouterr().out
    expected = flops.mae_flops(build_model("mae", {"n_genes": 300, "hidden": [256, 128], "latent": 32}).cfg)
    assert f"forward {expected.forward:.4g} FLOPs/cell" in out and f"forward+backward {expected.train:.4g}" in out


def linear_mae(weight: torch.Tensor):
    """An MAE whose encoder is one bias-free linear map (hidden=[]): attributions are exact."""
    m = build_model("mae", {"n_genes": weight.shape[1], "hidden": [], "latent": weight.shape[0], "dropout": 0.0})
    with torch.no_grad():
        m.encoder[0].weight.copy_(weight)
        m.encoder[0].bias.zero_()
    return m


def test_mae_gradient_x_input_is_complete_for_a_linear_encoder():
    torch.manual_seed(0)
    m = linear_mae(torch.randn(3, 10))
    x = torch.rand(5, 10)
    u = torch.randn(3)
    attr = gene_attributions(m, x, score=lambda emb, idx: emb @ u)
    assert torch.allclose(attr, x * (u @ m.encoder[0].weight), atol=1e-6)
    assert torch.allclose(attr.sum(1), m.encode(x) @ u, atol=1e-5)  # attributions sum to the score
    assert all(p.grad is None for p in m.parameters())  # weights receive no gradient


def test_top_genes_per_type_finds_the_markers():
    # type 0 expresses genes 0-2, type 1 genes 5-7, everything else at background
    x = torch.full((8, 10), 0.1)
    x[:4, 0:3] = torch.tensor([3.0, 2.0, 1.0])
    x[4:, 5:8] = torch.tensor([1.0, 3.0, 2.0])
    labels = torch.tensor([0] * 4 + [1] * 4)
    m = linear_mae(torch.eye(10))
    attr = gene_attributions(m, x, labels=labels)
    top = top_genes_per_type(attr, labels, [f"g{i}" for i in range(10)], ["B cell", "T cell"], k=3)
    assert [g for g, _ in top["B cell"]] == ["g0", "g1", "g2"]
    assert [g for g, _ in top["T cell"]] == ["g6", "g7", "g5"]
    assert top["B cell"][0][1] > top["B cell"][1][1] > 0


def test_performer_saliency_zero_for_unexpressed_and_mode_restored():
    torch.manual_seed(0)
    model = build_model("performer", {**TINY["performer"], "n_genes": 20})
    c = torch.poisson(torch.rand(6, 20) * 2)
    tok = preprocess(c, PreprocessSpec(kind="bins", append_pad=True))
    model.train()
    attr = gene_attributions(model, tok, labels=torch.tensor([0, 0, 0, 1, 1, 1]), batch_size=4)
    assert attr.shape == (6, 20) and model.training and int(model.forward_calls) == 0
    assert (attr[c == 0] == 0).all() and (attr[c > 0] != 0).any()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="labels"):
        gene_attributions(model, tok)


@pytest.mark.parametrize("kind", ["byol", "barlow"])
def test_contrastive_flops_match_flop_counter(kind):
    from scpretrain.train import objectives
    from scpretrain.train.config import load_config
    from scpretrain.train.trainer import build_model_for

    cfg = load_config(None, ["model.family=mae", f"objective.kind={kind}", "objective.proj_hidden=32",
                             "objective.proj_dim=16", *[f"model.params.{k}={v}" for k, v in TINY["mae"].items()
                                                        if k != "n_genes"]])
    model = build_model_for(cfg, 300)
    x = torch.rand(8, 300)
    with FlopCounterMode(display=False) as fc:
        loss, _ = objectives.contrastive_step(model, kind, x, None, torch.Generator().manual_seed(0), 0.2, 0.0, 0.005)
        loss.backward()
    f = flops.flops_per_cell("mae", TINY["mae"], cfg.objective)
    assert math.isclose(f.train, fc.get_total_flops() / 8, rel_tol=0.10)
