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

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from scpretrain.evaluate.errors import EvaluateError

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (embeddings [B, d], cell index [B]) -> [B]


def _encoder(model: Any) -> torch.nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def _type_directions(model: Any, x: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
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


def _attribute_batch(enc: Any, xb: torch.Tensor, idx: torch.Tensor, score: Score) -> torch.Tensor:
    if getattr(enc, "family", None) == "performer":
        seen = {}

        def hook(_module: Any, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.detach().requires_grad_(True)  # the gradient stops here: frozen weights or not
            seen["e"] = out
            return out

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


# --- the command: top genes per cell type of labelled cells, and where known markers rank -------------------

def interpret(model: Any, adata: Any, label_key: str, *, top: int = 20, max_cells_per_type: int = 200,
              seed: int = 0, read: Any = None, **options: Any) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Gradient x input attributions of the export's genes for the labelled cells of ``adata`` (at most
    ``max_cells_per_type`` per type, drawn with ``seed``); returns (the ``top`` genes of each type as a table:
    cell_type, rank, gene_id, symbol, attribution; the mean attribution [types, genes]; the types)."""
    from scpretrain.evaluate.align import align_to_vocab
    from scpretrain.evaluate.embedding import as_export, pick_device
    from scpretrain.evaluate.finetune import labels_of
    from scpretrain.evaluate.options import split_options
    from scpretrain.scmodels.preprocess import preprocess

    read, _ = split_options("interpret", read, None, options, fits=False)
    if top < 1 or max_cells_per_type < 1:
        raise EvaluateError(f"interpret: top ({top}) and max_cells_per_type ({max_cells_per_type}) must be >= 1")
    model = as_export(model)
    labels, rows = labels_of(adata, label_key, name="adata")
    rng = np.random.default_rng(seed)
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == t))[:max_cells_per_type]
                                   for t in np.unique(labels)]))
    counts, _ = align_to_vocab(adata, model.vocab, layer=read.layer, name="adata", **read.align())
    counts = counts[rows][keep]
    types = sorted(set(labels[keep].tolist()))
    codes = torch.as_tensor(np.searchsorted(np.asarray(types), labels[keep]))
    dev = pick_device(read.device)
    module = copy.deepcopy(model.module).to(dev)  # gradients flow to the input, never into the export
    module.requires_grad_(False)
    x = preprocess(torch.from_numpy(np.asarray(counts.toarray(), dtype=np.float32)).to(dev), model.preprocessing)
    attr = gene_attributions(module, x, codes.to(dev), batch_size=min(read.batch_size, 64)).cpu()
    mean = torch.stack([attr[codes == t].mean(0) for t in range(len(types))]).numpy()
    tops = top_genes_per_type(attr, codes, [str(i) for i in range(model.n_genes)], types, k=top)
    table = pd.DataFrame([(t, r + 1, model.gene_ids[int(g)], model.symbols[int(g)], v)
                          for t in types for r, (g, v) in enumerate(tops[t])],
                         columns=["cell_type", "rank", "gene_id", "symbol", "attribution"])
    return table, mean, types


def marker_ranks(model: Any, mean: np.ndarray, types: list[str], markers: dict[str, list[str]]) -> pd.DataFrame:
    """Where each marker gene ranks (1 = most attributed) among the export's genes for its cell type."""
    from scpretrain.scmodels.genes import normalize_gene_id

    col = {}
    for i, (g, s) in enumerate(model.vocab):
        col.setdefault(normalize_gene_id(g), i)
        col.setdefault(s.upper(), i)
    rows = []
    for t, genes in markers.items():
        if t not in types:
            raise EvaluateError(f"--markers: cell type {t!r} is not among the labels {types}")
        order = np.argsort(-mean[types.index(t)], kind="stable")
        rank_of = np.empty(len(order), dtype=np.int64)
        rank_of[order] = np.arange(1, len(order) + 1)
        for g in genes:
            c = col.get(normalize_gene_id(g), col.get(g.upper()))
            rows.append((t, g, int(rank_of[c]) if c is not None else None, len(order)))
    return pd.DataFrame(rows, columns=["cell_type", "marker", "rank", "of_genes"])


def parse_markers(spec: str) -> dict[str, list[str]]:
    """``"CD14 Monocytes=CD14,LYZ;B cells=MS4A1,CD79A"`` -> {type: [genes]}."""
    out: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        if "=" not in part:
            raise EvaluateError(f"--markers: {part!r} is not 'TYPE=GENE,GENE'; separate types with ';'")
        t, genes = part.split("=", 1)
        out[t.strip()] = [g.strip() for g in genes.split(",") if g.strip()]
    return out
