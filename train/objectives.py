"""Pretraining objectives. Masks are drawn from an explicit generator so that a step's mask
depends only on (seed, rank, step): resume is exact without saving mask RNG state."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scmodels.performer import MASK_TOKEN


def mae_random_mask(model, x: torch.Tensor, gen: torch.Generator, mask_prob: float,
                    reference_divisor: bool = False) -> tuple[torch.Tensor, dict]:
    """Random masking (p), kept inputs rescaled by 1/(1-p); MSE over masked entries.

    ``reference_divisor`` divides by all entries as the reference code did (not the paper).
    """
    mask = torch.rand(x.shape, generator=gen, device=x.device) < mask_prob
    inp = x.masked_fill(mask, 0.0) / (1.0 - mask_prob)
    recon = model(inp)
    sq = (recon.float() - x) ** 2 * mask
    denom = mask.numel() if reference_divisor else mask.sum().clamp_min(1)
    loss = sq.sum() / denom
    return loss, {"masked_frac": mask.float().mean().detach()}


def performer_masked_bins(model, tokens: torch.Tensor, expressed: torch.Tensor, gen: torch.Generator,
                          mask_prob: float, keep_prob: float) -> tuple[torch.Tensor, dict]:
    """Mask ``mask_prob`` of the expressed genes; of those, ``keep_prob`` stay unchanged and the
    rest become [MASK]. Cross-entropy over the masked positions only."""
    G = expressed.shape[1]
    r = torch.rand(expressed.shape, generator=gen, device=tokens.device)
    chosen = (r < mask_prob) & expressed
    keep = torch.rand(expressed.shape, generator=gen, device=tokens.device) < keep_prob
    inp = tokens.clone()
    inp[:, :G] = torch.where(chosen & ~keep, torch.full_like(tokens[:, :G], MASK_TOKEN), tokens[:, :G])
    logits = model(inp)[:, :G]
    target = tokens[:, :G][chosen]
    if target.numel() == 0:  # no expressed gene drawn: a zero loss that still touches every weight
        return logits.sum() * 0.0, {"masked_acc": torch.tensor(0.0), "masked_frac": torch.tensor(0.0)}
    pred = logits[chosen]
    loss = F.cross_entropy(pred.float(), target)
    acc = (pred.argmax(-1) == target).float().mean()
    return loss, {"masked_acc": acc.detach(), "masked_frac": chosen.float().mean().detach()}


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1))
    return g
