"""Masked autoencoder (Richter et al., Nat. Mach. Intell. 2024): architecture only."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class MAEConfig:
    n_genes: int
    hidden: list[int] = field(default_factory=lambda: [512, 512, 256, 256])
    latent: int = 64
    dropout: float = 0.1
    # The reference ends the decoder with a sigmoid although targets are unbounded
    # log1p values; linear output is the default, True restores the literal reference.
    sigmoid_output: bool = False


def _mlp(dims: list[int], dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), nn.SELU(), nn.Dropout(dropout)]
    return layers


class MAE(nn.Module):
    """Encoder G -> hidden... -> latent (linear output); decoder latent -> reversed hidden -> G."""

    family = "mae"

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        enc_dims = [cfg.n_genes, *cfg.hidden]
        self.encoder = nn.Sequential(*_mlp(enc_dims, cfg.dropout), nn.Linear(enc_dims[-1], cfg.latent))
        dec_dims = [cfg.latent, *reversed(cfg.hidden)]
        head: list[nn.Module] = [nn.Linear(dec_dims[-1], cfg.n_genes)]
        if cfg.sigmoid_output:
            head.append(nn.Sigmoid())
        self.decoder = nn.Sequential(*_mlp(dec_dims, cfg.dropout), *head)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """log1p-normalized expression [B, G] -> embedding [B, latent]."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))
