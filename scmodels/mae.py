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
    # Switches for imported weights (train/published.py); our own pretraining keeps the defaults.
    activation: str = "selu"  # "selu" (the MAE reference) | "relu" (ssl_in_scg's MLPClassifier)
    latent_activation: bool = False  # apply the activation to the latent too (a classifier's last hidden layer)
    decoder: bool = True  # False: encoder only (an imported classifier has no decoder)


ACTIVATIONS = {"selu": nn.SELU, "relu": nn.ReLU}


def _mlp(dims: list[int], dropout: float, activation: str = "selu") -> list[nn.Module]:
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), ACTIVATIONS[activation](), nn.Dropout(dropout)]
    return layers


class MAE(nn.Module):
    """Encoder G -> hidden... -> latent (linear output); decoder latent -> reversed hidden -> G."""

    family = "mae"

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation: {cfg.activation!r} is not one of {sorted(ACTIVATIONS)}")
        enc_dims = [cfg.n_genes, *cfg.hidden]
        body = _mlp(enc_dims, cfg.dropout, cfg.activation)  # built first: the initial weights are drawn in order
        latent: list[nn.Module] = [nn.Linear(enc_dims[-1], cfg.latent)]
        if cfg.latent_activation:
            latent.append(ACTIVATIONS[cfg.activation]())
        self.encoder = nn.Sequential(*body, *latent)
        self.decoder: nn.Module | None = None
        if not cfg.decoder:
            return
        dec_dims = [cfg.latent, *reversed(cfg.hidden)]
        head: list[nn.Module] = [nn.Linear(dec_dims[-1], cfg.n_genes)]
        if cfg.sigmoid_output:
            head.append(nn.Sigmoid())
        self.decoder = nn.Sequential(*_mlp(dec_dims, cfg.dropout, cfg.activation), *head)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """log1p-normalized expression [B, G] -> embedding [B, latent]."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise RuntimeError("this MAE has no decoder (model.decoder=false: imported from a classifier); "
                               "use encode(), or pretrain with model.init_from, which adds one")
        return self.decoder(self.encoder(x))
