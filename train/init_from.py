"""``model.init_from``: start pretraining from an export (ours, or published weights imported with
``python -m train import-weights``) on a corpus whose vocabulary only partly overlaps the export's."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from scpretrain.scmodels.genes import normalize_gene_id
from scpretrain.train.published import WeightsError


def gene_rows(src: list[tuple[str, str]], dst: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(dst_positions, src_positions) of the genes both vocabularies hold: matched by normalized gene id,
    then the rest by symbol (scBERT's vocabulary is symbols only)."""
    by_id = {normalize_gene_id(g): i for i, (g, _) in enumerate(src)}
    by_sym: dict[str, int] = {}
    for i, (_, s) in enumerate(src):
        by_sym.setdefault(s.upper(), i)
    pairs, taken = [], set()
    for j, (g, s) in enumerate(dst):
        i = by_id.get(normalize_gene_id(g))
        if i is None and s:
            i = by_sym.get(s.upper())
        if i is not None and i not in taken:
            taken.add(i)
            pairs.append((j, i))
    arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


# parameters that do not change which tensors a model has: the user's explicit value wins over the export's
FREE_PARAMS = {"dropout", "feature_redraw_interval", "freeze_gene_embedding", "redraw_seed", "sigmoid_output"}


def init_params(export_dir: str | Path, family: str, params: dict, explicit: dict) -> tuple[dict, Any]:
    """The hyperparameters of a model started from ``export_dir``: the export's architecture (n_genes aside),
    ``params`` for the rest; an explicit ``model.params`` value that contradicts the export is refused."""
    from scpretrain.evaluate.errors import EvaluateError
    from scpretrain.evaluate.export_io import load_export

    try:
        export = load_export(export_dir)
    except EvaluateError as e:
        raise WeightsError(f"model.init_from: {e}") from None
    if export.family != family:
        raise WeightsError(f"model.init_from: {export_dir} is a {export.family} export, but model.family is "
                           f"{family!r}; set model.family={export.family}")
    theirs = {k: v for k, v in export.config["model"].items() if k != "n_genes"}
    for k, v in explicit.items():
        if k in theirs and k not in FREE_PARAMS and theirs[k] != v:
            raise WeightsError(f"model.params.{k}: {v!r}, but the export in model.init_from ({export_dir}) has "
                               f"{theirs[k]!r}; remove model.params.{k} (the architecture comes from the export)")
    merged = {**params, **{k: v for k, v in theirs.items() if k not in explicit}}
    if family == "mae":
        merged["decoder"] = True  # pretraining reconstructs: an encoder-only import gets a fresh decoder
    return merged, export


def _gene_axes(model: torch.nn.Module) -> dict[str, int]:
    """Tensors indexed by gene, and along which axis."""
    if model.family == "performer":
        return {"gene_emb.weight": 0}
    last = f"decoder.{3 * len(model.cfg.hidden)}"
    return {"encoder.0.weight": 1, f"{last}.weight": 0, f"{last}.bias": 0}


@torch.no_grad()
def init_from_export(model: torch.nn.Module, export: Any, vocab: list[tuple[str, str]]) -> dict:
    """Copy an export's weights into ``model`` (built for ``vocab``): every gene-independent tensor, and the rows /
    columns of the genes both vocabularies hold; the rest stays as initialized. Returns the coverage report."""
    src = export.module.state_dict()
    dst_pos, src_pos = gene_rows(export.vocab, vocab)
    if len(dst_pos) == 0:
        raise WeightsError(f"model.init_from: none of the corpus's {len(vocab)} genes is in {export.path}/vocab.tsv "
                           "(matched by Ensembl id, then symbol); check that both use the same species and ids")
    axes, fresh = _gene_axes(model), []
    d_idx, s_idx = torch.from_numpy(dst_pos), torch.from_numpy(src_pos)
    for key, t in model.state_dict().items():
        if key not in src:
            fresh.append(key)
        elif key in axes:
            t.index_copy_(axes[key], d_idx, src[key].index_select(axes[key], s_idx).to(t.dtype))
        elif src[key].shape != t.shape:
            raise WeightsError(f"model.init_from: tensor {key!r} is {list(src[key].shape)} in {export.path} but "
                               f"{list(t.shape)} here; the hyperparameters differ")
        else:
            t.copy_(src[key])
    return {"export": str(export.path), "weights_sha256": export.weights_sha256, "export_genes": export.n_genes,
            "corpus_genes": len(vocab), "genes_shared": int(len(dst_pos)),
            "coverage": round(len(dst_pos) / len(vocab), 4),
            "fresh_tensors": sorted({k.rsplit(".", 1)[0] for k in fresh})}
