"""Contrastive heads on the MAE encoder (Richter et al. 2024: BYOL and Barlow twins): architecture only.

``ContrastiveMAE`` wraps an :class:`~scmodels.mae.MAE` and adds a projector (both methods), a
predictor and an exponential-moving-average target (BYOL). The losses, the augmentations and
the call that moves the target live in ``train.objectives``.

The wrapped MAE stays a complete MAE under ``backbone``: an export takes
``export_module(model)`` (``train.export``), so downstream code loads it like any MAE. Its
decoder is frozen here (no contrastive loss reaches it) so that no optimizer holds weights
that never receive a gradient.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from scpretrain.scmodels.mae import MAE

METHODS = ("byol", "barlow")


@dataclass
class ContrastiveConfig:
    method: str = "byol"  # byol | barlow
    proj_hidden: int = 512
    proj_dim: int = 128
    pred_hidden: int = 512  # BYOL predictor
    ema_decay: float = 0.99  # BYOL target: t <- decay * t + (1 - decay) * online


def _head(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU -> Linear: the BYOL / Barlow projector and predictor shape."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class EMATarget(nn.Module):
    """A frozen copy of a module whose weights are held as buffers.

    Buffers, not frozen parameters, because: they are in the state dict (a checkpoint resumes the
    target exactly), no optimizer ever sees them, ZeRO-3 does not partition them, and DeepSpeed's
    mixed precision keeps buffers fp32 — an EMA with decay 0.99 rounded to bf16 would lose most
    of its updates.
    """

    def __init__(self, source: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(source)
        for m in self.net.modules():
            for name, p in list(m._parameters.items()):
                del m._parameters[name]
                if p is not None:
                    m.register_buffer(name, p.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = next(iter(self.net.buffers())).dtype
        with torch.no_grad():
            return self.net(x.to(dtype))

    @torch.no_grad()
    def update(self, source: nn.Module, decay: float) -> None:
        """t <- decay * t + (1 - decay) * s for every parameter of ``source`` (same structure)."""
        for name, s in source.named_parameters():
            t = self.net.get_buffer(name)
            t.mul_(decay).add_(s.detach().to(t.dtype), alpha=1.0 - decay)


class ContrastiveMAE(nn.Module):
    """Online MAE encoder + projector (+ predictor and EMA target for BYOL)."""

    family = "mae"

    def __init__(self, backbone: MAE, head: ContrastiveConfig):
        super().__init__()
        if head.method not in METHODS:
            raise ValueError(f"contrastive method {head.method!r} is not one of {METHODS}")
        self.backbone = backbone
        self.cfg = backbone.cfg  # hparams of the export: the MAE's
        self.head_cfg = head
        backbone.decoder.requires_grad_(False)
        self.projector = _head(backbone.cfg.latent, head.proj_hidden, head.proj_dim)
        self.predictor = _head(head.proj_dim, head.pred_hidden, head.proj_dim) if head.method == "byol" else None
        self.target = EMATarget(nn.Sequential(backbone.encoder, self.projector)) if head.method == "byol" else None

    def online(self) -> nn.Sequential:
        """The network the target follows, with the target's structure (encoder, projector)."""
        return nn.Sequential(self.backbone.encoder, self.projector)

    @torch.no_grad()
    def update_target(self) -> None:
        if self.target is not None:
            self.target.update(self.online(), self.head_cfg.ema_decay)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode(x)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Two views [B, G] -> projections ``z1, z2``; BYOL adds predictions ``p1, p2`` and the
        target's projections ``t1, t2`` (no gradient)."""
        z1, z2 = self.projector(self.backbone.encode(v1)), self.projector(self.backbone.encode(v2))
        out = {"z1": z1, "z2": z2}
        if self.predictor is not None:
            out["p1"], out["p2"] = self.predictor(z1), self.predictor(z2)
            out["t1"], out["t2"] = self.target(v1), self.target(v2)
        return out
