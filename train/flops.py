"""Analytic FLOPs per cell for each model family, for MFU (model FLOPs utilisation).

Counted: matrix multiplications only, 2 FLOPs per multiply-add, as
``torch.utils.flop_counter.FlopCounterMode`` counts them (a test holds the two together).
Elementwise work (activations, LayerNorm, the exponentials of FAVOR+) is left out: it is a few
percent of the total and not what tensor cores do.

Backward: each matmul costs twice its forward (gradient of its input and of its weight), except
where an operand needs no gradient: the MAE's first layer (its input is data) skips the input
gradient, and FAVOR+'s random projection (a buffer) skips the projection's gradient.

    python -m train.flops --preset mae_base --n-genes 19331
    python -m train.flops --preset scbert_base --n-genes 16906
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from scpretrain.scmodels.build import model_config
from scpretrain.scmodels.mae import MAEConfig
from scpretrain.scmodels.performer import PerformerConfig


@dataclass(frozen=True)
class Flops:
    forward: float  # FLOPs per cell
    backward: float

    @property
    def train(self) -> float:
        """Forward + backward FLOPs per cell (one optimizer-relevant pass)."""
        return self.forward + self.backward


def _chain(dims: list[int], data_input: bool) -> Flops:
    """A chain of Linear layers; ``data_input``: the first layer's input needs no gradient."""
    layers = [2.0 * a * b for a, b in zip(dims[:-1], dims[1:])]
    fwd = sum(layers)
    return Flops(fwd, 2 * fwd - (layers[0] if data_input else 0.0))


def mae_flops(cfg: MAEConfig) -> Flops:
    return _chain([cfg.n_genes, *cfg.hidden, cfg.latent, *reversed(cfg.hidden), cfg.n_genes], data_input=True)


def contrastive_flops(cfg: MAEConfig, method: str, proj_hidden: int, proj_dim: int) -> Flops:
    """BYOL / Barlow twins on the MAE encoder, per cell: two views through encoder + projector
    (+ predictor for BYOL), and for BYOL two forward passes of the EMA target (no backward).
    The decoder is not run."""
    enc = _chain([cfg.n_genes, *cfg.hidden, cfg.latent], data_input=True)
    proj = _chain([cfg.latent, proj_hidden, proj_dim], data_input=False)
    fwd, bwd = enc.forward + proj.forward, enc.backward + proj.backward
    if method == "byol":
        pred = _chain([proj_dim, proj_hidden, proj_dim], data_input=False)
        fwd, bwd = fwd + pred.forward + enc.forward + proj.forward, bwd + pred.backward
    return Flops(2 * fwd, 2 * bwd)


def performer_flops(cfg: PerformerConfig) -> Flops:
    """scBERT Performer: QKV/out projections, FAVOR+ feature maps of q and k, linear attention
    (k^T v, the normaliser, the output), feed-forward, and the token reconstructor. The
    gene-identity projection (``gene_embedding_dim``), computed once per batch, is left out."""
    n, d, h, e, m = cfg.n_genes + 1, cfg.dim, cfg.heads, cfg.dim_head, cfg.nb_features
    inner = h * e
    proj = 2.0 * n * d * inner * 4  # q, k, v, out
    feature_maps = 2 * (2.0 * n * e * m * h)  # q and k against the [m, e] projection
    attention = (2.0 * n * m * e + 2.0 * n * m + 2.0 * n * m * e) * h  # k^T v; q . sum(k); q (k^T v)
    ff = 2 * (2.0 * n * d * d * cfg.ff_mult)
    head = 2.0 * n * d * cfg.n_tokens
    fwd = cfg.depth * (proj + feature_maps + attention + ff) + head
    bwd = 2 * fwd - cfg.depth * feature_maps  # no gradient for the random projection
    return Flops(fwd, bwd)


def flops_per_cell(family: str, hparams: dict, objective: Any = None) -> Flops:
    """FLOPs per cell of ``family`` with ``hparams``; pass the run's ``ObjectiveConfig`` to count
    a contrastive objective's two views and heads instead of the masked reconstruction."""
    cfg = model_config(family, hparams)
    if family == "performer":
        return performer_flops(cfg)
    if objective is not None and objective.kind in ("byol", "barlow"):
        return contrastive_flops(cfg, objective.kind, objective.proj_hidden, objective.proj_dim)
    return mae_flops(cfg)


def activation_bytes_per_cell(family: str, hparams: dict, checkpoint_layers: bool = False,
                              probe_genes: int = 1024) -> float:
    """Bytes autograd keeps per cell for the backward pass (fp32; bf16 keeps about half).

    Measured, not modelled: one forward + loss of a 2-cell batch under ``saved_tensors_hooks``,
    summing every distinct saved tensor that is not a parameter. A Performer's activations grow
    linearly with its sequence, so it is probed at ``probe_genes`` positions and scaled. With
    ``checkpoint_layers`` a Performer keeps each layer's input (depth x positions x dim) plus, during
    the backward pass, one layer's activations (the measured total / depth)."""
    import torch

    from scpretrain.scmodels.build import build_model

    n = hparams["n_genes"]
    probe = min(n, probe_genes) if family == "performer" else n
    model = build_model(family, {**hparams, "n_genes": probe})
    model.train()
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    batch, g = 2, torch.Generator().manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if family == "performer":
            model(torch.randint(0, 6, (batch, probe + 1), generator=g)).float().mean()
        else:
            model(torch.rand(batch, probe, generator=g)).mean()
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    per_cell = sum(v for k, v in seen.items() if k not in params) / batch
    if family != "performer":
        return per_cell
    per_cell *= (n + 1) / (probe + 1)
    if checkpoint_layers:
        depth, dim = model.cfg.depth, model.cfg.dim
        per_cell = per_cell / depth + depth * (n + 1) * dim * 4
    return per_cell


def main(argv: list[str] | None = None) -> None:
    import yaml

    from scpretrain.train.config import REPO, ModelConfig, resolve_model_params

    ap = argparse.ArgumentParser(prog="python -m train.flops", description="Analytic FLOPs per cell of a model preset")
    ap.add_argument("--preset", required=True, help="a file in configs/model/ without .yaml, e.g. mae_base")
    ap.add_argument("--n-genes", type=int, required=True, help="input genes (vocabulary size)")
    args = ap.parse_args(argv)
    path = REPO / "configs" / "model" / f"{args.preset}.yaml"
    if not path.exists():
        ap.error(f"--preset: {path} not found")
    family = yaml.safe_load(path.read_text())["family"]
    params = {**resolve_model_params(ModelConfig(family=family, preset=args.preset)), "n_genes": args.n_genes}
    f = flops_per_cell(family, params)
    print(f"{args.preset} ({family}, {args.n_genes:,} genes): forward {f.forward:.4g} FLOPs/cell, "
          f"forward+backward {f.train:.4g} FLOPs/cell")
    print("MFU = cells/s x forward+backward FLOPs/cell / peak FLOP/s of the devices")


if __name__ == "__main__":
    main()
