"""Per-gene attribution for a set of cells, and the top genes per cell type (as scBERT reports them).

Gradient x input, pure torch, no attention maps (FAVOR+ never forms them):
- MAE: d score / d x_g * x_g on the log1p input.
- Performer: for each gene position, the gradient of the score with respect to the token
  embedding, dotted with (embedding of the cell's bin - embedding of bin 0, "not expressed"):
  the first-order effect of the gene's expression against an unexpressed baseline.

The score of a cell is, by default, how far its embedding points toward its own cell type:
<embedding, centroid(type) - mean of the centroids>; pass ``score`` (e.g. a fine-tuned head's
logit of the cell's class) to explain something else. Model weights receive no gradient.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (embeddings [B, d], cell index [B]) -> [B]


def _encoder(model):
    return getattr(model, "module", model)


@torch.no_grad()
def _type_directions(model, x: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    enc = _encoder(model)
    emb = torch.cat([enc.encode(x[i:i + batch_size]).float() for i in range(0, x.shape[0], batch_size)])
    n_types = int(labels.max()) + 1
    labels = labels.to(emb.device)
    cent = emb.new_zeros(n_types, emb.shape[1]).index_add_(0, labels, emb)
    cent = cent / torch.bincount(labels, minlength=n_types).clamp_min(1)[:, None].float()
    return cent - cent.mean(0)


def gene_attributions(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor | None = None, score: Score | None = None,
                      batch_size: int = 64) -> torch.Tensor:
    """Attribution [N, G] (float32) of each gene to each cell's score.

    ``x``: model input (MAE: float log1p [N, G]; Performer: long tokens [N, G+1]).
    ``labels``: integer cell-type codes [N], for the default score; or give ``score``.
    Runs in eval mode (the previous mode is restored).
    """
    if score is None:
        if labels is None:
            raise ValueError("gene_attributions: pass labels (cell-type codes) or a score function")
        dirs = _type_directions(model, x, labels, batch_size)

        def score(emb, idx):
            return (emb.float() * dirs[labels[idx]]).sum(-1)

    enc = _encoder(model)
    was = enc.training
    enc.eval()
    try:
        out = [_attribute_batch(enc, x[i:i + batch_size], torch.arange(i, min(i + batch_size, x.shape[0])), score)
               for i in range(0, x.shape[0], batch_size)]
    finally:
        enc.train(was)
    return torch.cat(out)


def _attribute_batch(enc, xb: torch.Tensor, idx: torch.Tensor, score: Score) -> torch.Tensor:
    if getattr(enc, "family", None) == "performer":
        seen = {}

        def hook(_module, _inp, out):
            seen["e"] = out

        h = enc.token_emb.register_forward_hook(hook)
        try:
            s = score(enc.encode(xb), idx).sum()
        finally:
            h.remove()
        (grad,) = torch.autograd.grad(s, seen["e"])
        w = enc.token_emb.weight.detach()
        delta = w[xb] - w[0]
        return (grad * delta).sum(-1)[:, :-1].float()
    xg = xb.detach().float().requires_grad_(True)
    (grad,) = torch.autograd.grad(score(enc.encode(xg), idx).sum(), xg)
    return (grad * xg).detach()


def top_genes_per_type(attr: torch.Tensor, labels: torch.Tensor, gene_names: Sequence[str],
                       type_names: Sequence[str] | None = None, k: int = 10) -> dict[str, list[tuple[str, float]]]:
    """For each cell type, the ``k`` genes with the largest mean attribution over its cells."""
    out = {}
    for t in torch.unique(labels).tolist():
        mean = attr[labels == t].mean(0)
        vals, cols = torch.topk(mean, min(k, mean.numel()))
        name = type_names[t] if type_names is not None else str(t)
        out[name] = [(gene_names[c], float(v)) for v, c in zip(vals.tolist(), cols.tolist())]
    return out
