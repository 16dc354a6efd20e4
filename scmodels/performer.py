"""scBERT-style Performer encoder (Yang et al., Nat. Mach. Intell. 2022): architecture only.

Expression-bin token embedding + gene identity embedding, Performer blocks from
``performer-pytorch`` (pre-LayerNorm, FAVOR+), and a Linear(dim -> n_tokens) reconstructor.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import performer_pytorch.performer_pytorch as _pp
import torch
from performer_pytorch import Performer
from performer_pytorch.performer_pytorch import FastAttention
from torch import nn
from torch.utils.checkpoint import checkpoint

MASK_TOKEN = 6  # tokens 0..5 are expression bins


def _favor(data: torch.Tensor, proj: torch.Tensor, is_query: bool, normalize_data: bool, eps: float) -> torch.Tensor:
    """FAVOR+ positive random features (performer-pytorch's ``softmax_kernel``, same formula), in fp32:
    exp() of bf16 differences loses the small features the attention normaliser sums."""
    normalizer = data.shape[-1] ** -0.25 if normalize_data else 1.0
    ratio = proj.shape[0] ** -0.5
    dash = torch.einsum("...id,jd->...ij", normalizer * data, proj)
    diag = (data * data).sum(dim=-1, keepdim=True) * (0.5 * normalizer ** 2)
    stab = dash.amax(dim=-1, keepdim=True) if is_query else dash.amax(dim=(-1, -2), keepdim=True)
    return ratio * (torch.exp(dash - diag - stab.detach()) + eps)


_fused = {"fn": None, "failed": False}


def softmax_kernel_fp32(data: torch.Tensor, *, projection_matrix: torch.Tensor, is_query: bool,
                        normalize_data: bool = True, eps: float = 1e-4, device: object = None) -> torch.Tensor:
    """Drop-in for performer-pytorch's ``softmax_kernel``: computed in fp32 whatever the input dtype,
    returned in the input's dtype. On CUDA one ``torch.compile``d kernel (einsum, exp and the
    reductions fused; SCPRETRAIN_FUSED_FAVOR=0 turns it off); eager elsewhere or if compiling fails."""
    fn = _favor
    if data.is_cuda and os.environ.get("SCPRETRAIN_FUSED_FAVOR", "1") != "0" and not _fused["failed"]:
        if _fused["fn"] is None:
            _fused["fn"] = torch.compile(_favor, dynamic=False)
        fn = _fused["fn"]
    try:
        out = fn(data.float(), projection_matrix.float(), is_query, normalize_data, eps)
    except Exception as e:  # noqa: BLE001 - a compiler problem must not stop training
        if fn is _favor:
            raise
        _fused["failed"] = True
        print(f"[scmodels] fused FAVOR+ kernel unavailable ({type(e).__name__}: {e}); using the eager one", flush=True)
        out = _favor(data.float(), projection_matrix.float(), is_query, normalize_data, eps)
    return out.to(data.dtype)


# FastAttention looks the kernel up in its module at call time: every Performer built here uses this one
reference_softmax_kernel = getattr(_pp, "reference_softmax_kernel", _pp.softmax_kernel)
_pp.reference_softmax_kernel = reference_softmax_kernel
_pp.softmax_kernel = softmax_kernel_fp32


def _layer(attn: nn.Module, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One Performer layer exactly as performer-pytorch's SequentialSequence runs it (pre-norm residuals)."""
    x = x + attn(x)
    return x + ff(x)


@dataclass
class PerformerConfig:
    n_genes: int
    dim: int = 200
    depth: int = 6
    heads: int = 10
    dim_head: int = 64
    nb_features: int = 266  # int(64 * ln 64), as in scBERT
    feature_redraw_interval: int = 1000
    ff_mult: int = 4
    dropout: float = 0.0
    n_tokens: int = 7
    freeze_gene_embedding: bool = True
    # Width of the gene identity table; None means ``dim``. When it differs (e.g. 1536-d GenePT
    # text embeddings), a trainable bias-free Linear(gene_embedding_dim -> dim) maps it, so the
    # appended pad position stays a zero vector.
    gene_embedding_dim: int | None = None
    # Seed of the FAVOR+ redraws: every rank draws the same matrices (the reference
    # used each rank's own RNG, so ranks diverged after the first redraw).
    redraw_seed: int = 0
    # Bias on the q/k/v projections: performer-pytorch's Performer default; scBERT's released weights have none.
    qkv_bias: bool = True


class PerformerEncoder(nn.Module):
    family = "performer"

    def __init__(self, cfg: PerformerConfig):
        super().__init__()
        self.cfg = cfg
        self.seq_len = cfg.n_genes + 1  # scBERT appends one zero position
        self.token_emb = nn.Embedding(cfg.n_tokens, cfg.dim)
        width = cfg.gene_embedding_dim or cfg.dim
        self.gene_emb = nn.Embedding(self.seq_len, width)
        with torch.no_grad():
            self.gene_emb.weight[-1].zero_()
        self.gene_emb.weight.requires_grad_(not cfg.freeze_gene_embedding)
        self.gene_proj = nn.Linear(width, cfg.dim, bias=False) if width != cfg.dim else None
        self.performer = Performer(
            dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, dim_head=cfg.dim_head,
            nb_features=cfg.nb_features, feature_redraw_interval=cfg.feature_redraw_interval,
            ff_mult=cfg.ff_mult, ff_dropout=cfg.dropout, attn_dropout=cfg.dropout,
            auto_check_redraw=False,  # redraws are ours: seeded, identical on every rank
            qkv_bias=cfg.qkv_bias,
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.to_out = nn.Linear(cfg.dim, cfg.n_tokens)
        self.register_buffer("forward_calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("redraws", torch.zeros((), dtype=torch.long))
        # activation checkpointing per layer (training only; ``model.checkpoint_layers``): each layer keeps
        # its input and recomputes its activations in the backward pass, ~depth x less activation memory
        self.checkpoint_layers = False

    def load_gene_embedding(self, weights: torch.Tensor) -> None:
        """Copy a [n_genes, width] gene-identity matrix (e.g. gene2vec) in, cast to float32 (the
        reference kept gene2vec float64, which DeepSpeed's fp32/bf16 engines cannot hold)."""
        expected = (self.cfg.n_genes, self.gene_emb.weight.shape[1])
        if tuple(weights.shape) != expected:
            raise ValueError(f"gene embedding has shape {tuple(weights.shape)}, expected {expected} "
                             "(n_genes, gene_embedding_dim or dim)")
        with torch.no_grad():
            self.gene_emb.weight[:-1].copy_(weights.to(torch.float32))
            self.gene_emb.weight[-1].zero_()

    def gene_identity(self) -> torch.Tensor:
        """[G+1, dim] gene identity vectors (projected when the table is wider than ``dim``)."""
        g = self.gene_emb.weight
        return self.gene_proj(g) if self.gene_proj is not None else g

    @torch.no_grad()
    def redraw_projections(self) -> None:
        """Redraw every FAVOR+ projection from (redraw_seed, redraw count) on the CPU RNG."""
        self.redraws += 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.redraw_seed * 1_000_003 + int(self.redraws))
            for fa in self.performer.modules():
                if isinstance(fa, FastAttention):
                    fa.projection_matrix.copy_(fa.create_projection(device="cpu"))

    def _maybe_redraw(self) -> None:
        interval = self.cfg.feature_redraw_interval
        if self.training and interval:
            if int(self.forward_calls) > 0 and int(self.forward_calls) % interval == 0:
                self.redraw_projections()
            self.forward_calls += 1

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, G+1] (long) -> per-position representations [B, G+1, dim]."""
        if tokens.shape[1] != self.seq_len:
            raise ValueError(f"expected {self.seq_len} positions (n_genes + 1), got {tokens.shape[1]}")
        self._maybe_redraw()
        x = self.token_emb(tokens) + self.gene_identity().unsqueeze(0)
        if self.checkpoint_layers and self.training and torch.is_grad_enabled():
            for attn, ff in self.performer.net.layers:
                x = checkpoint(_layer, attn, ff, x, use_reentrant=False)
            return self.norm(x)
        return self.norm(self.performer(x))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits over the expression tokens at every position, [B, G+1, n_tokens]."""
        return self.to_out(self.hidden(tokens))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cell embedding [B, dim]: mean of the gene-position representations (pad excluded)."""
        return self.hidden(tokens)[:, :-1].mean(dim=1)
