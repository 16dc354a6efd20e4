"""Objectives: gene-programme and isolated masks, contrastive losses and augmentations, dispatch,
held-out metrics, the EMA hook (plain and under a real DeepSpeed engine)."""
import math

import pytest
import torch

from scpretrain.scmodels import build_model
from scpretrain.train.contrastive import ContrastiveConfig, ContrastiveMAE
from scpretrain.train import objectives
from scpretrain.train.config import load_config
from scpretrain.train.trainer import build_model_for, train_step

G = 40
TINY_M = dict(n_genes=G, hidden=[32, 16], latent=8, dropout=0.0)
TINY_P = dict(n_genes=G, dim=16, depth=1, heads=2, dim_head=8, nb_features=8, feature_redraw_interval=0)
# 8 programmes over 40 genes, overlapping; genes 36..39 belong to none
PROGS = [list(range(i * 4, i * 4 + 6)) for i in range(8)]


def programmes() -> objectives.Programmes:
    genes = [g for p in PROGS for g in p]
    owner = [i for i, p in enumerate(PROGS) for _ in p]
    return objectives.Programmes([f"P{i}" for i in range(8)], torch.tensor(genes), torch.tensor(owner), G)


def counts(b=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.rand(b, G, generator=gen) * 6, generator=gen)


def log1p_inputs(b=16, seed=0):
    c = counts(b, seed)
    lib = c.sum(1)
    return {"x": torch.log1p(c / lib.clamp_min(1)[:, None] * 1e4), "expressed": c > 0, "library_size": lib}


def cfg_for(kind, family="mae", extra=()):
    return load_config(None, [f"model.family={family}", f"objective.kind={kind}", *extra])


class Spy:
    def __init__(self):
        self.inputs = []

    def __call__(self, inp):
        self.inputs.append(inp)
        return inp * 0


# ---- GMT ---------------------------------------------------------------------------------------

def test_gmt_maps_to_vocab_by_symbol_and_drops_empty(tmp_path):
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("A\tdesc\tG1\tG3\tNOPE\nB\tdesc\tG2\nEMPTY\tdesc\tX1\tX2\n\n")
    vocab = [(f"ENSG{i:011d}", f"G{i}") for i in range(5)]
    p = objectives.load_programmes(gmt, vocab)
    assert p.names == ["A", "B"] and p.n_genes == 5
    assert p.columns(torch.tensor([True, False])).nonzero().flatten().tolist() == [1, 3]
    assert p.columns(torch.tensor([False, True])).nonzero().flatten().tolist() == [2]


def test_gmt_matches_versioned_ensembl_ids(tmp_path):
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("A\tx\tENSG00000000001.4\tENSG00000000002\n")
    p = objectives.load_programmes(gmt, [("ENSG00000000001", "a"), ("ENSG00000000002.7", "b"), ("ENSG00000000003", "c")])
    assert p.columns(torch.tensor([True])).tolist() == [True, True, False]


def test_bad_gmt_line_names_file_and_line(tmp_path):
    gmt = tmp_path / "bad.gmt"
    gmt.write_text("A\tdesc\tG1\nB only\n")
    with pytest.raises(ValueError, match=r"bad\.gmt: line 2"):
        objectives.read_gmt(gmt)


# ---- mask statistics ---------------------------------------------------------------------------

def test_gene_programme_masks_whole_programmes_same_for_every_cell():
    progs, spy = programmes(), Spy()
    chosen_counts = torch.zeros(8)
    n = 400
    for s in range(n):
        objectives.mae_gene_programme(spy, torch.ones(5, G), torch.Generator().manual_seed(s), progs, 0.25)
        inp = spy.inputs[-1]
        masked = inp[0] == 0
        assert (inp == 0).eq(masked).all()  # the same mask in every cell
        # the mask is exactly the union of int(8 * 0.25) = 2 programmes
        hits = [i for i, p in enumerate(PROGS) if masked[p].all()]
        union = torch.zeros(G, dtype=torch.bool)
        for i in hits:
            union[PROGS[i]] = True
        assert torch.equal(union, masked)
        assert 2 <= len(hits)  # overlaps can make a third programme fully covered
        # kept inputs rescaled by 1/(1 - masked share)
        assert torch.allclose(inp[0][~masked], torch.full_like(inp[0][~masked], 1 / (1 - masked.float().mean())))
        chosen_counts[hits] += 1
    assert not masked[36:].any()  # genes in no programme are never masked
    freq = chosen_counts / n
    assert (freq > 0.25 - 0.08).all() and (freq < 0.25 + 0.15).all(), freq  # each ~2/8, plus overlap coverage


def test_isolated_keeps_exactly_one_programme():
    progs, spy = programmes(), Spy()
    x = torch.rand(6, G) + 0.5
    seen = set()
    for s in range(40):
        loss, extra = objectives.mae_isolated(spy, x, torch.Generator().manual_seed(s), progs)
        kept = spy.inputs[-1] != 0
        assert kept.eq(kept[0]).all()  # the same for every cell
        cols = kept[0].nonzero().flatten().tolist()
        assert cols in PROGS  # exactly one programme, no rescale
        assert torch.equal(spy.inputs[-1][:, cols], x[:, cols])
        # loss: MSE of a zero reconstruction over everything else
        other = torch.ones(G, dtype=torch.bool)
        other[cols] = False
        assert math.isclose(loss.item(), (x[:, other] ** 2).mean().item(), rel_tol=1e-5)
        seen.add(PROGS.index(cols))
    assert len(seen) >= 6  # drawn across programmes


def test_masked_mse_divisors_exact():
    recon, target = torch.zeros(2, 4), torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 2.0]])
    mask = torch.tensor([[True, False, False, True], [False, False, False, True]])
    assert objectives.masked_mse(recon, target, mask).item() == pytest.approx((1 + 16 + 4) / 3)
    assert objectives.masked_mse(recon, target, mask, reference_divisor=True).item() == pytest.approx(21 / 8)


# ---- contrastive augmentations and losses ------------------------------------------------------

def test_nb_noise_recovers_counts_and_has_nb_variance():
    c = torch.full((4000, 3), 0.0)
    c[:, 0], c[:, 1] = 50.0, 10.0
    c[:, 2] = 940.0  # library 1000
    lib = c.sum(1)
    x = torch.log1p(c / lib[:, None] * 1e4)
    # theta = inf-like: Poisson only; noise-free identity check through expm1 * lib / 1e4
    assert torch.allclose(torch.expm1(x) * lib[:, None] / 1e4, c, rtol=1e-4)
    theta = 5.0
    gen = torch.Generator().manual_seed(0)
    mu = torch.expm1(x) * (lib / 1e4)[:, None]
    g = torch._standard_gamma(torch.full_like(mu, theta), generator=gen)
    draws = torch.poisson(g * mu / theta, generator=gen)[:, 0]
    assert abs(draws.mean().item() - 50) < 1.5
    assert abs(draws.var().item() - (50 + 50**2 / theta)) / (50 + 50**2 / theta) < 0.1
    v = objectives.nb_noise(x, lib, theta, torch.Generator().manual_seed(1))
    assert v.shape == x.shape and (v >= 0).all() and not torch.equal(v, x)
    assert torch.allclose(torch.expm1(v).sum(1), torch.full((4000,), 1e4), rtol=1e-4)  # renormalized


def test_augment_mask_rate_and_determinism():
    d = log1p_inputs(64)
    v1 = objectives.augment(d["x"], d["library_size"], torch.Generator().manual_seed(3), 0.3, 10.0)
    v2 = objectives.augment(d["x"], d["library_size"], torch.Generator().manual_seed(3), 0.3, 10.0)
    assert torch.equal(v1, v2)
    zero_before = (d["x"] == 0).float().mean()
    assert (v1 == 0).float().mean() >= zero_before + 0.2  # at least most of the 30% masked entries


def test_barlow_loss_exact_and_minimal_for_decorrelated_identical_views():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert objectives.barlow_loss(z, z, 0.5, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)
    z2 = z.clone()
    z2[:, 1] = z[:, 0]  # second dim of view 2 copies the first: C = [[1, 1], [0, 0]]
    assert objectives.barlow_loss(z, z2, 0.5, eps=0.0).item() == pytest.approx(1.0 + 0.5 * 1.0)


def test_byol_loss_zero_when_predictions_match_targets():
    t = torch.randn(5, 4)
    out = {"p1": 2 * t, "p2": t, "t1": t, "t2": t}
    assert objectives.byol_loss(out).item() == pytest.approx(0.0, abs=1e-6)
    out["p1"] = -t
    assert objectives.byol_loss(out).item() == pytest.approx(4.0, abs=1e-5)


def test_alignment_uniformity_exact():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert objectives.alignment(f, f).item() == 0.0
    assert objectives.alignment(f, -f).item() == pytest.approx(4.0)
    assert objectives.uniformity(f).item() == pytest.approx(-4.0)  # one pair at squared distance 2
    assert objectives.pearson_r(torch.arange(5.0), 2 * torch.arange(5.0) + 1).item() == pytest.approx(1.0)


# ---- each objective overfits one batch ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["random_mask", "gene_programme", "isolated", "byol", "barlow", "masked_bins"])
def test_each_objective_overfits_one_batch(kind):
    family = "performer" if kind == "masked_bins" else "mae"
    extra = ["objective.proj_hidden=32", "objective.proj_dim=8", "objective.mask_prob=0.5"] if kind != "masked_bins" else []
    cfg = cfg_for(kind, family, extra)
    model = build_model_for(cfg, G) if family == "mae" else build_model("performer", TINY_P)
    if family == "mae":
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    d = log1p_inputs(32)
    if kind == "masked_bins":
        from scpretrain.scmodels import PreprocessSpec, preprocess

        c = counts(32)
        d = {"x": preprocess(c, PreprocessSpec(kind="bins", append_pad=True)), "expressed": c > 0}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(80):
        loss, _ = objectives.objective_step(model, cfg, d, torch.Generator().manual_seed(0), programmes())
        opt.zero_grad()
        loss.backward()
        opt.step()
        objectives.after_step(model)
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


# ---- gradients only where expected -------------------------------------------------------------

def test_byol_target_gets_no_grad_and_follows_ema_exactly():
    torch.manual_seed(0)
    model = ContrastiveMAE(build_model("mae", TINY_M), ContrastiveConfig("byol", 16, 8, 16, ema_decay=0.9))
    assert not any(n.startswith("target") for n, _ in model.named_parameters())  # never in an optimizer
    assert all(not p.requires_grad for p in model.backbone.decoder.parameters())
    d = log1p_inputs(16)
    weights = {n for n, _ in model.online().named_parameters()}  # BN running stats move in forward
    before = {k: v.clone() for k, v in model.target.net.named_buffers() if k in weights}
    loss, _ = objectives.contrastive_step(model, "byol", d["x"], d["library_size"], torch.Generator().manual_seed(0),
                                          0.2, 10.0, 0.0)
    loss.backward()
    assert all(p.grad is None for p in model.backbone.decoder.parameters())
    assert all(p.grad is not None for p in model.projector.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    assert all(torch.equal(before[k], model.target.net.get_buffer(k)) for k in weights)  # optimizer left it
    objectives.after_step(model)
    for k, p in model.online().named_parameters():
        assert torch.allclose(model.target.net.get_buffer(k), 0.9 * before[k] + 0.1 * p.detach()), k
    assert model.target.net.get_buffer("0.0.weight").dtype == torch.float32


def test_byol_forward_after_a_blanket_bf16_cast():
    model = ContrastiveMAE(build_model("mae", TINY_M), ContrastiveConfig("byol", 16, 8, 16))
    model.to(torch.bfloat16)  # DeepSpeed 0.19 keeps buffers fp32 under bf16; a blanket cast must still run
    out = model(torch.rand(4, G, dtype=torch.bfloat16), torch.rand(4, G, dtype=torch.bfloat16))
    assert out["t1"].shape == (4, 8)


# ---- dispatch, determinism, metrics ------------------------------------------------------------

def test_kind_validation_names_the_key():
    with pytest.raises(ValueError, match=r"objective\.kind: 'byol' does not apply to model\.family='performer'"):
        objectives.resolve_kind("performer", "byol")
    with pytest.raises(ValueError, match=r"objective\.kind: 'simclr' is not one of"):
        objectives.resolve_kind("mae", "simclr")
    assert objectives.resolve_kind("mae", "auto") == "random_mask"
    assert objectives.resolve_kind("performer", "auto") == "masked_bins"
    with pytest.raises(ValueError, match=r"objective\.gmt"):
        objectives.objective_step(build_model("mae", TINY_M), cfg_for("gene_programme"), log1p_inputs(),
                                  torch.Generator())


def test_train_step_reads_gmt_against_corpus_vocab(tmp_path):
    (tmp_path / "vocab.tsv").write_text("gene_id\tsymbol\n" + "".join(f"ENSG{i:011d}\tG{i}\n" for i in range(G)))
    gmt = tmp_path / "p.gmt"
    gmt.write_text("".join(f"P{i}\td\t" + "\t".join(f"G{g}" for g in p) + "\n" for i, p in enumerate(PROGS)))
    cfg = cfg_for("gene_programme", extra=[f"objective.gmt={gmt}", f"data.corpus={tmp_path}"])
    model = build_model_for(cfg, G)
    from scpretrain.sharding.manifest import read_vocab

    objective = objectives.build_objective("mae", cfg.objective, vocab=read_vocab(tmp_path))
    loss, extra = train_step(model, objective, log1p_inputs(), objectives.step_generator(0, 0, 1, torch.device("cpu")))
    assert loss.item() > 0 and 0 < extra["masked_frac"] < 1


@pytest.mark.parametrize("kind", ["random_mask", "gene_programme", "isolated", "byol", "barlow", "masked_bins"])
def test_determinism_under_fixed_seed(kind):
    family = "performer" if kind == "masked_bins" else "mae"
    cfg = cfg_for(kind, family, ["objective.proj_hidden=16", "objective.proj_dim=8"] if family == "mae" else [])
    vals = []
    for _ in range(2):
        model = build_model_for(cfg, G) if family == "mae" else (torch.manual_seed(0), build_model("performer", TINY_P))[1]
        d = log1p_inputs(8)
        if family == "performer":
            from scpretrain.scmodels import PreprocessSpec, preprocess

            c = counts(8)
            d = {"x": preprocess(c, PreprocessSpec(kind="bins", append_pad=True)), "expressed": c > 0}
        torch.manual_seed(7)  # dropout
        loss, _ = objectives.objective_step(model, cfg, d, objectives.step_generator(0, 1, 5, torch.device("cpu")),
                                            programmes())
        vals.append(loss.item())
    assert vals[0] == vals[1]


@pytest.mark.parametrize("kind,keys", [
    ("random_mask", {"loss", "masked_mse", "masked_pearson"}),
    ("gene_programme", {"loss", "masked_mse", "masked_pearson"}),
    ("isolated", {"loss", "masked_mse", "masked_pearson"}),
    ("byol", {"loss", "alignment", "uniformity"}),
    ("barlow", {"loss", "alignment", "uniformity"}),
    ("masked_bins", {"loss", "masked_acc"}),
])
def test_evaluate_batch_metrics(kind, keys):
    family = "performer" if kind == "masked_bins" else "mae"
    cfg = cfg_for(kind, family, ["objective.proj_hidden=16", "objective.proj_dim=8"] if family == "mae" else [])
    model = build_model_for(cfg, G) if family == "mae" else build_model("performer", TINY_P)
    d = log1p_inputs(32)
    if family == "performer":
        from scpretrain.scmodels import PreprocessSpec, preprocess

        c = counts(32)
        d = {"x": preprocess(c, PreprocessSpec(kind="bins", append_pad=True)), "expressed": c > 0}
    model.train()
    m1 = objectives.evaluate_batch(model, cfg, d, torch.Generator().manual_seed(0), programmes())
    m2 = objectives.evaluate_batch(model, cfg, d, torch.Generator().manual_seed(0), programmes())
    assert set(m1) == keys and m1 == m2 and model.training  # deterministic; mode restored
    assert all(math.isfinite(v) for v in m1.values())
    if "masked_pearson" in m1:
        assert -1 <= m1["masked_pearson"] <= 1 and m1["masked_mse"] == m1["loss"]
    if "masked_acc" in m1:
        assert 0 <= m1["masked_acc"] <= 1


def test_masked_pearson_is_one_for_a_perfect_reconstruction():
    cfg = cfg_for("random_mask")
    d = log1p_inputs(8)
    x = d["x"]

    class Oracle(torch.nn.Module):
        def forward(self, inp):
            return x

    m = objectives.evaluate_batch(Oracle(), cfg, d, torch.Generator().manual_seed(0))
    assert m["masked_mse"] == 0.0 and m["masked_pearson"] == pytest.approx(1.0)


# ---- the EMA hook under a real DeepSpeed engine ------------------------------------------------

@pytest.mark.parametrize("zero_stage", [2, 3])
def test_after_step_under_deepspeed_moves_target_only_on_applied_steps(monkeypatch, zero_stage):
    import deepspeed

    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", str(29600 + zero_stage))):
        monkeypatch.setenv(k, v)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        _ema_under_engine(deepspeed, zero_stage)
    finally:  # DeepSpeed caches its groups: release them so the next in-process engine starts clean
        deepspeed.comm.destroy_process_group()


def _ema_under_engine(deepspeed, zero_stage):
    from scpretrain.train.engine import build_engine

    cfg = cfg_for("byol", extra=["objective.proj_hidden=16", "objective.proj_dim=8", "engine.grad_accum=2",
                                 f"engine.zero_stage={zero_stage}", "data.batch_size=8", "objective.ema_decay=0.5"])
    model = build_model_for(cfg, G)
    engine, _ = build_engine(cfg, model, 1, "cpu")
    opt_params = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert not any(id(b) in opt_params for b in engine.module.target.buffers())
    weights = {n for n, _ in engine.module.online().named_parameters()}
    snap = lambda: {k: v.clone() for k, v in engine.module.target.net.named_buffers() if k in weights}  # noqa: E731
    d = log1p_inputs(8)
    applied, moved = [], []
    for micro in range(6):
        loss, _ = train_step(engine, objectives.build_objective("mae", cfg.objective), d,
                             objectives.step_generator(0, 0, micro, torch.device("cpu")))
        engine.backward(loss)
        engine.step()
        before = snap()
        objectives.after_step(engine)
        after = snap()
        applied.append(engine.was_step_applied())
        params = list(engine.module.online().parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):
            for k, p in engine.module.online().named_parameters():
                expected = 0.5 * before[k] + 0.5 * p.detach().float() if applied[-1] else before[k]
                assert torch.allclose(after[k], expected, atol=1e-7), k
        moved.append(any(not torch.equal(before[k], after[k]) for k in before))
    assert applied == [False, True] * 3  # optimizer steps only at the accumulation boundary
    assert moved[-1]  # once the warmup lr is above 0 the online weights move, and the target follows
