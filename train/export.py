"""Export: a self-contained directory a downstream team loads without DeepSpeed or training code.

Layout (ARCHITECTURE.md, Export contract)::

    config.json        model_family, model hyperparameters, preprocessing spec, vocab hash, provenance
    model.safetensors  consolidated fp32 weights of the pretraining module (encoder + its reconstruction head)
    vocab.tsv          gene_id<TAB>symbol, one row per model input column, in order
    README.md          a short model card

Written into a temporary sibling directory and swapped into place (``scmodels.atomic.replace_dir``),
so a crash never leaves a directory that looks like a complete export, and replacing an export
never leaves a moment without one.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from scpretrain.scmodels.atomic import check_replaceable, replace_dir, temp_sibling
from scpretrain.scmodels.build import embedding_key, hparams_of
from scpretrain.scmodels.genes import EXPORT_FORMAT_VERSION, VOCAB_FILE, format_vocab, vocab_sha256
from scpretrain.scmodels.preprocess import PreprocessSpec


def export_module(model: torch.nn.Module) -> torch.nn.Module:
    """The part of a training module an export holds: the MAE inside a contrastive wrapper
    (its projector, predictor and EMA target are training-only), else the module itself."""
    return getattr(model, "backbone", model)


def _alias(key: str) -> bool:
    """performer-pytorch registers every layer twice (``net`` and ``proj_updater.instance``);
    the export keeps one copy (safetensors refuses shared tensors, and it halves the file)."""
    return ".proj_updater.instance." in key


def _model_card(cfg: dict) -> str:
    fam = cfg["model_family"]
    prov = cfg.get("provenance", {})
    return (
        f"# {fam} encoder export\n\n"
        f"- family: `{fam}`; {cfg['n_genes']} input genes (see `vocab.tsv`, sha256 `{cfg['vocab_sha256'][:12]}…`)\n"
        f"- preprocessing: `{json.dumps(cfg['preprocessing'])}` applied to raw counts\n"
        f"- trained steps: {prov.get('steps', '?')}, cells seen: {prov.get('cells_seen', '?')}\n"
        f"- corpus manifest sha256: {prov.get('corpus_manifest_sha256', '?')}\n\n"
        "## Use\n\n```python\nimport anndata\nfrom scpretrain import evaluate\nmodel = evaluate.load_export('THIS_DIR')\n"
        "adata = anndata.read_h5ad('cells.h5ad')  # raw counts in X\n"
        f"evaluate.embed(model, adata)  # adata.obsm['{embedding_key(fam)}']\n```\n"
    )


def write_export(
    out_dir: str | Path,
    state_dict: dict[str, torch.Tensor],
    family: str,
    hparams: dict,
    preprocessing: PreprocessSpec,
    vocab: list[tuple[str, str]],
    provenance: dict | None = None,
    notes: str = "",
    also: Callable[[Path], None] | None = None,
) -> Path:
    """Write an export atomically. ``vocab`` is [(gene_id, symbol), ...] in model column order; ``notes`` are
    appended to README.md; ``also(folder)`` adds files (e.g. a head) before the folder is swapped in."""
    out = Path(out_dir)
    gene_ids = [g for g, _ in vocab]
    if hparams.get("n_genes") != len(gene_ids):
        raise ValueError(f"export: model n_genes={hparams.get('n_genes')} but vocabulary has {len(gene_ids)} genes")
    cfg = {
        "format_version": EXPORT_FORMAT_VERSION,
        "model_family": family,
        "model": hparams,
        "preprocessing": preprocessing.to_dict(),
        "n_genes": len(gene_ids),
        "vocab_sha256": vocab_sha256(gene_ids),
        "embedding_key": embedding_key(family),
        "provenance": {"exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(provenance or {})},
    }
    check_replaceable(out, "config.json", "export")
    tmp = temp_sibling(out)
    tensors = {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).clone()
               for k, v in state_dict.items() if not _alias(k)}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"model_family": family})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (tmp / VOCAB_FILE).write_text(format_vocab(vocab))
    (tmp / "README.md").write_text(_model_card(cfg) + (f"\n{notes}" if notes else ""))
    if also is not None:
        try:
            also(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    replace_dir(tmp, out)  # fsyncs, then swaps in one step: never a moment without a complete export
    return out


def export_model(out_dir: str | Path, model: torch.nn.Module, preprocessing: PreprocessSpec,
                 vocab: list[tuple[str, str]], provenance: dict | None = None) -> Path:
    """Export an in-memory model (all weights present on this process)."""
    return write_export(out_dir, model.state_dict(), model.family, hparams_of(model), preprocessing, vocab, provenance)
