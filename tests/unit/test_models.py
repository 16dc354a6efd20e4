"""Models and objectives: shapes, mask statistics, overfitting, frozen weights, determinism, redraws."""
import math

import pytest
import torch

from scpretrain.scmodels import PreprocessSpec, build_model, csr_to_dense, preprocess
from scpretrain.scmodels.performer import MASK_TOKEN
from scpretrain.train import objectives
from scpretrain.train.config import load_config, resolve_model_params

TINY_P = dict(n_genes=40, dim=16, depth=1, heads=2, dim_head=8, nb_features=8, feature_redraw_interval=3)
TINY_M = dict(n_genes=40, hidden=[32, 16], latent=8, dropout=0.0)


def counts(b=16, g=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.rand(b, g, generator=gen) * 3, generator=gen)


def test_binning_exact():
    c = torch.tensor([[0.0, 1.0, 3.0, 9996.0]])
    # normalized to 1e4: 0, 1, 3, 9996 -> log2(1+x) floor -> 0, 1, 2, 13 -> clip 5
    assert preprocess(c, PreprocessSpec(kind="bins")).tolist() == [[0, 1, 2, 5]]
    assert preprocess(c, PreprocessSpec(kind="bins", append_pad=True)).shape == (1, 5)
    lp = preprocess(c, PreprocessSpec(kind="log1p"))
    assert torch.allclose(lp, torch.log1p(c))


def test_csr_to_dense_exact():
    d = csr_to_dense(torch.tensor([0, 2, 2, 3]), torch.tensor([1, 3, 0]), torch.tensor([5.0, 2.0, 7.0]), 4)
    assert d.tolist() == [[0, 5, 0, 2], [0, 0, 0, 0], [7, 0, 0, 0]]


def test_shapes():
    p = build_model("performer", TINY_P)
    tok = preprocess(counts(), PreprocessSpec(kind="bins", append_pad=True))
    assert p(tok).shape == (16, 41, 7) and p.encode(tok).shape == (16, 16)
    m = build_model("mae", TINY_M)
    x = preprocess(counts(), PreprocessSpec())
    assert m(x).shape == (16, 40) and m.encode(x).shape == (16, 8)


def test_performer_mask_statistics_only_expressed():
    c = counts(b=256, g=40)
    tok = preprocess(c, PreprocessSpec(kind="bins", append_pad=True))
    expressed = c > 0
    seen = {}

    def spy(inp):
        seen["inp"] = inp
        return torch.zeros(inp.shape[0], inp.shape[1], 7, requires_grad=True)

    gen = torch.Generator().manual_seed(12345)  # not the seed that drew the counts
    objectives.performer_masked_bins(spy, tok, expressed, gen, mask_prob=0.15, keep_prob=0.1)
    masked = seen["inp"][:, :40] == MASK_TOKEN
    assert not (masked & ~expressed).any()  # only expressed genes are masked
    rate = masked.sum() / expressed.sum()
    assert abs(rate.item() - 0.15 * 0.9) < 0.02


def test_mae_mask_rate_and_rescale():
    x = torch.ones(64, 40)
    seen = {}

    def spy(inp):
        seen["inp"] = inp
        return inp * 0

    objectives.mae_random_mask(spy, x, torch.Generator().manual_seed(12345), 0.5)
    inp = seen["inp"]
    assert abs((inp == 0).float().mean().item() - 0.5) < 0.05
    assert torch.allclose(inp[inp != 0], torch.full_like(inp[inp != 0], 2.0))  # 1/(1-p)


@pytest.mark.parametrize("family", ["mae", "performer"])
def test_objective_overfits_one_batch(family):
    torch.manual_seed(0)
    c = counts(b=8)
    if family == "mae":
        model = build_model("mae", TINY_M)
        x = preprocess(c, PreprocessSpec())
        step = lambda g: objectives.mae_random_mask(model, x, g, 0.5)  # noqa: E731
    else:
        model = build_model("performer", {**TINY_P, "feature_redraw_interval": 0})
        tok = preprocess(c, PreprocessSpec(kind="bins", append_pad=True))
        step = lambda g: objectives.performer_masked_bins(model, tok, c > 0, g, 0.5, 0.0)  # noqa: E731
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for i in range(150):
        loss, _ = step(torch.Generator().manual_seed(0))  # same mask every step: memorise it
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.3 * first


def test_frozen_gene_embedding_stays_fixed():
    model = build_model("performer", {**TINY_P, "freeze_gene_embedding": True})
    before = model.gene_emb.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    c = counts()
    tok = preprocess(c, PreprocessSpec(kind="bins", append_pad=True))
    loss, _ = objectives.performer_masked_bins(model, tok, c > 0, torch.Generator().manual_seed(1), 0.5, 0.0)
    loss.backward()
    opt.step()
    assert model.gene_emb.weight.grad is None
    assert torch.equal(before, model.gene_emb.weight)
    assert model.token_emb.weight.grad is not None


def test_redraws_are_seeded_not_rank_rng():
    a, b = build_model("performer", TINY_P), build_model("performer", TINY_P)
    b.load_state_dict(a.state_dict())
    tok = torch.zeros(2, 41, dtype=torch.long)
    torch.manual_seed(1)
    for _ in range(4):
        a(tok)
    torch.manual_seed(999)  # a different global RNG, as on another rank
    for _ in range(4):
        b(tok)
    assert int(a.redraws) == 1
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def test_determinism_under_seed():
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        m = build_model("mae", TINY_M)
        outs.append(objectives.mae_random_mask(m, torch.rand(4, 40), objectives.step_generator(0, 0, 3, torch.device("cpu")), 0.5)[0])
    assert outs[0].item() == outs[1].item()


@pytest.mark.parametrize("preset,n_genes,expected", [
    ("mae_base", 19331, 20.8e6),
])
def test_base_parameter_counts(preset, n_genes, expected):
    cfg = load_config(None, [f"model.family={preset.split('_')[0]}", f"model.preset={preset}"])
    m = build_model(cfg.model.family, {**resolve_model_params(cfg.model), "n_genes": n_genes})
    n = sum(p.numel() for p in m.parameters())
    assert math.isclose(n, expected, rel_tol=0.01), n


def test_scbert_base_shapes():
    cfg = load_config(None, ["model.family=performer", "model.preset=scbert_base"])
    m = build_model("performer", {**resolve_model_params(cfg.model), "n_genes": 16906})
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert m.gene_emb.weight.shape == (16907, 200)  # the 3.4M-entry gene embedding (frozen)
    assert m.gene_emb.weight.numel() == 3_381_400
    assert m.performer.net.layers[0][0].fn.to_q.weight.shape == (640, 200)  # 10 heads x 64
    assert len(m.performer.net.layers) == 6
    assert 4.5e6 < trainable < 5.5e6, trainable  # the card: about 5.0M trainable


PRESETS = sorted((__import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "model").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_model_preset_builds_and_runs(path):
    import yaml

    family = yaml.safe_load(path.read_text())["family"]
    cfg = load_config(None, [f"model.family={family}", f"model.preset={path.stem}"])
    m = build_model(family, {**resolve_model_params(cfg.model), "n_genes": 50})
    c = counts(b=2, g=50)
    x = preprocess(c, PreprocessSpec(kind="bins", append_pad=True) if family == "performer" else PreprocessSpec())
    m.eval()
    assert m.encode(x).shape[0] == 2


def test_mae_base_layer_shapes():
    cfg = load_config(None, ["model.family=mae", "model.preset=mae_base"])
    m = build_model("mae", {**resolve_model_params(cfg.model), "n_genes": 19331})
    lin = lambda seq: [tuple(l.weight.shape) for l in seq if isinstance(l, torch.nn.Linear)]  # noqa: E731
    assert lin(m.encoder) == [(512, 19331), (512, 512), (256, 512), (256, 256), (64, 256)]
    assert lin(m.decoder) == [(256, 64), (256, 256), (512, 256), (512, 512), (19331, 512)]
    acts = [type(l).__name__ for l in m.encoder]
    assert acts.count("SELU") == 4 and acts.count("Dropout") == 4 and isinstance(m.encoder[-1], torch.nn.Linear)
    assert all(l.p == 0.1 for l in m.encoder if isinstance(l, torch.nn.Dropout))
    assert not isinstance(m.decoder[-1], torch.nn.Sigmoid)  # linear output; sigmoid_output=true is the reference
    literal = build_model("mae", {**resolve_model_params(cfg.model), "n_genes": 100, "sigmoid_output": True})
    assert isinstance(literal.decoder[-1], torch.nn.Sigmoid)


def test_scbert_base_attention_settings():
    from performer_pytorch.performer_pytorch import FastAttention

    cfg = load_config(None, ["model.family=performer", "model.preset=scbert_base"])
    m = build_model("performer", {**resolve_model_params(cfg.model), "n_genes": 16906})
    layers = m.performer.net.layers
    assert len(layers) == 6
    attn = layers[0][0].fn
    assert attn.heads == 10 and attn.to_out.weight.shape == (200, 640)
    fas = [x for x in m.modules() if isinstance(x, FastAttention)]
    assert {tuple(fa.projection_matrix.shape) for fa in fas} == {(266, 64)}  # int(64 ln 64) features x dim_head
    assert m.cfg.feature_redraw_interval == 1000 and m.cfg.dropout == 0.0
    assert layers[0][1].fn.fn.w1.weight.shape == (800, 200)  # FF x4
    assert m.token_emb.weight.shape == (7, 200) and m.to_out.weight.shape == (7, 200)
    assert m.gene_emb.weight.requires_grad is False  # frozen by default


def test_redraws_use_linalg_qr_not_deprecated_torch_qr(monkeypatch):
    """performer-pytorch 1.1.4 calls torch.linalg.qr on torch >= 1.8 (the scBERT copy used torch.qr)."""
    def deprecated(*a, **k):
        raise AssertionError("torch.qr called")

    monkeypatch.setattr(torch, "qr", deprecated)
    m = build_model("performer", TINY_P)
    m.redraw_projections()
    assert int(m.redraws) == 1


def test_favor_features_are_performer_pytorchs_formula_in_fp32():
    from scpretrain.scmodels.performer import reference_softmax_kernel, softmax_kernel_fp32

    g = torch.Generator().manual_seed(0)
    data, proj = torch.randn(2, 3, 50, 16, generator=g), torch.randn(24, 16, generator=g)
    for is_query in (True, False):
        ref = reference_softmax_kernel(data, projection_matrix=proj, is_query=is_query)
        ours = softmax_kernel_fp32(data, projection_matrix=proj, is_query=is_query)
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-7)
        # bf16 in, bf16 out, but computed in fp32: closer to the fp32 features than performer-pytorch's bf16 pass
        b = data.to(torch.bfloat16)
        ours16 = softmax_kernel_fp32(b, projection_matrix=proj, is_query=is_query)
        ref16 = reference_softmax_kernel(b, projection_matrix=proj, is_query=is_query)
        exact = reference_softmax_kernel(b.float(), projection_matrix=proj, is_query=is_query)
        assert ours16.dtype == torch.bfloat16
        assert (ours16.float() - exact).abs().mean() < (ref16.float() - exact).abs().mean()


def test_performer_layer_checkpointing_gives_the_same_loss_and_gradients():
    from scpretrain.scmodels.build import build_model

    torch.manual_seed(0)
    m = build_model("performer", {"n_genes": 40, "dim": 16, "depth": 2, "heads": 2, "dim_head": 8, "nb_features": 12,
                                  "feature_redraw_interval": 0})
    tokens = torch.randint(0, 6, (3, 41))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.checkpoint_layers = ckpt
        loss = m(tokens).square().mean()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert len(grads[0][1]) == len(grads[1][1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_mae_initial_weights_are_drawn_in_layer_order():
    """The import switches (activation, latent_activation, decoder) leave our MAE's initialization as it was
    (the encoder layer by layer, then the decoder's output layer, then its hidden layers), so a seed gives the
    same model, and the same demo, as before them."""
    import torch
    from torch import nn

    from scpretrain.scmodels.build import build_model

    torch.manual_seed(3)
    ours = build_model("mae", {"n_genes": 30, "hidden": [16, 8], "latent": 4})
    torch.manual_seed(3)
    enc = [nn.Linear(30, 16), nn.SELU(), nn.Dropout(0.1), nn.Linear(16, 8), nn.SELU(), nn.Dropout(0.1), nn.Linear(8, 4)]
    out = nn.Linear(16, 30)
    dec = [nn.Linear(4, 8), nn.SELU(), nn.Dropout(0.1), nn.Linear(8, 16), nn.SELU(), nn.Dropout(0.1), out]
    ref = nn.ModuleDict({"encoder": nn.Sequential(*enc), "decoder": nn.Sequential(*dec)})
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
