"""Count preprocessing shared by the loader (on device) and the downstream module.

Units: inputs are raw integer counts per cell (float tensors are fine); the
normalized total is ``target_sum`` counts per cell.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class PreprocessSpec:
    """How counts become model inputs; written verbatim into every export.

    kind: ``"log1p"`` (MAE: normalize to ``target_sum``, natural log1p, floats) or
    ``"bins"`` (scBERT: normalize, log2(1 + x), floor, clip to ``max_bin``; 0 for
    unexpressed genes; ``append_pad`` adds the extra zero position scBERT appends).
    """

    kind: str = "log1p"
    target_sum: float = 1e4
    max_bin: int = 5
    append_pad: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"preprocessing: unknown field(s) {sorted(unknown)}; expected {sorted(cls.__dataclass_fields__)}")
        spec = cls(**d)
        if spec.kind not in ("log1p", "bins"):
            raise ValueError(f"preprocessing.kind: {spec.kind!r} is not one of 'log1p', 'bins'")
        return spec


def csr_to_dense(indptr: torch.Tensor, indices: torch.Tensor, data: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Densify a CSR block in one scatter on the tensors' device. Returns float32 [rows, n_cols]."""
    n_rows = indptr.numel() - 1
    counts = indptr[1:] - indptr[:-1]
    rows = torch.repeat_interleave(torch.arange(n_rows, device=indices.device), counts.to(indices.device))
    out = torch.zeros(n_rows, n_cols, dtype=torch.float32, device=indices.device)
    out[rows, indices.long()] = data.to(torch.float32)
    return out


def normalize_total(x: torch.Tensor, target_sum: float) -> torch.Tensor:
    """Scale each row to ``target_sum``; all-zero rows stay zero."""
    totals = x.sum(dim=1, keepdim=True)
    return x * (target_sum / totals.clamp_min(1e-12))


def bin_log2(x_norm: torch.Tensor, max_bin: int) -> torch.Tensor:
    """scBERT bins: min(floor(log2(1 + x)), max_bin), 0 where the gene is unexpressed."""
    tokens = torch.floor(torch.log2(1.0 + x_norm)).clamp_(0, max_bin)
    return tokens.long()


def preprocess(counts: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """Dense counts [B, G] -> model input: float32 [B, G] (log1p) or long [B, G(+1)] (bins)."""
    x = normalize_total(counts.to(torch.float32), spec.target_sum)
    if spec.kind == "log1p":
        return torch.log1p(x)
    tokens = bin_log2(x, spec.max_bin)
    if spec.append_pad:
        tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1)], dim=1)
    return tokens


def nb_features_default(dim_head: int) -> int:
    """FAVOR+ feature count used by scBERT: int(d * ln d)."""
    return int(dim_head * math.log(dim_head))
