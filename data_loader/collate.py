"""CSR batch -> model inputs on the device, in one pass (densify, normalize, log1p or bins)."""
from __future__ import annotations

import torch

from scpretrain.scmodels.preprocess import PreprocessSpec, csr_to_dense, preprocess


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Move the CSR tensors of a batch to ``device`` (non-blocking from pinned memory)."""
    nb = torch.device(device).type == "cuda"
    out = dict(batch)
    for k in ("indptr", "indices", "data", "cell_id"):
        out[k] = batch[k].to(device, non_blocking=nb)
    return out


def model_inputs(batch: dict, n_genes: int, spec: PreprocessSpec, device: torch.device | str) -> dict:
    """Returns ``x`` (float log1p [B, G] or long tokens [B, G(+1)]), ``expressed`` (bool [B, G]) and
    ``library_size`` (total counts per cell, float [B])."""
    b = to_device(batch, device)
    counts = csr_to_dense(b["indptr"], b["indices"], b["data"], n_genes)
    return {"x": preprocess(counts, spec), "expressed": counts > 0, "library_size": counts.sum(1),
            "cell_id": b["cell_id"]}
