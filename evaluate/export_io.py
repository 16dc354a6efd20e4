"""Load an export directory (ARCHITECTURE.md, Export contract) into a frozen encoder.

Only JSON, TSV and safetensors are read: no pickle, no ``torch.load``, no DeepSpeed
and no training code, so a downstream team can load an export from a file it did
not produce without running arbitrary code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from scpretrain.evaluate.errors import EvaluateError
from scpretrain.scmodels import FAMILIES, PreprocessSpec, build_model, embedding_key, preprocess
from scpretrain.scmodels.atomic import file_sha256
from scpretrain.scmodels.genes import EXPORT_FORMAT_VERSION, VOCAB_FILE, parse_vocab, vocab_sha256

# Newest export layout this reader understands: the one train/export.py writes.
SUPPORTED_FORMAT_VERSION = EXPORT_FORMAT_VERSION
REQUIRED_FILES = ("config.json", "model.safetensors", "vocab.tsv")
REQUIRED_FIELDS = {
    "format_version": int, "model_family": str, "model": dict, "preprocessing": dict,
    "n_genes": int, "vocab_sha256": str, "embedding_key": str,
}
# The input each family's architecture accepts; a mismatch would otherwise surface as a
# shape or dtype error deep inside the first forward pass.
_FAMILY_INPUT = {"mae": ("log1p", False), "performer": ("bins", True)}



@dataclass
class Export:
    """A loaded export: the frozen encoder in eval mode plus what it needs to read new cells.

    ``vocab`` is [(gene_id, symbol), ...] in model input column order; ``config`` is
    ``config.json`` verbatim.
    """

    path: Path
    family: str
    module: nn.Module
    vocab: list[tuple[str, str]]
    preprocessing: PreprocessSpec
    config: dict = field(repr=False)
    # sha256 of model.safetensors: a saved head records it, so it is never reused on other weights
    weights_sha256: str = ""

    @property
    def gene_ids(self) -> list[str]:
        return [g for g, _ in self.vocab]

    @property
    def symbols(self) -> list[str]:
        return [s for _, s in self.vocab]

    @property
    def n_genes(self) -> int:
        return len(self.vocab)

    @property
    def embedding_key(self) -> str:
        return self.config["embedding_key"]

    @property
    def vocab_sha256(self) -> str:
        return self.config["vocab_sha256"]

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.inference_mode()
    def encode_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Raw counts [B, n_genes] in vocabulary order -> embeddings [B, d] (float32, on CPU)."""
        if counts.ndim != 2 or counts.shape[1] != self.n_genes:
            raise EvaluateError(
                f"counts have shape {tuple(counts.shape)}; the export {self.path} expects "
                f"[cells, {self.n_genes}] in vocab.tsv order: align the genes first "
                "(evaluate.align.align_to_vocab)")
        x = preprocess(counts.to(self.device), self.preprocessing)
        return self.module.encode(x).float().cpu()

    def __repr__(self) -> str:
        return (f"Export(path={str(self.path)!r}, family={self.family!r}, n_genes={self.n_genes}, "
                f"embedding_key={self.embedding_key!r})")


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise EvaluateError(f"{cfg_path}: not valid JSON ({e}); "
                            "re-export the model with `python -m train export`") from e
    if not isinstance(cfg, dict):
        raise EvaluateError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}; "
                            "re-export the model")
    for name, typ in REQUIRED_FIELDS.items():
        if name not in cfg:
            raise EvaluateError(f"{cfg_path}: field {name!r} is missing; "
                                "re-export the model with `python -m train export`")
        if not isinstance(cfg[name], typ) or (typ is int and isinstance(cfg[name], bool)):
            raise EvaluateError(f"{cfg_path}: field {name!r} must be a {typ.__name__}, got {cfg[name]!r}")
    if cfg["format_version"] > SUPPORTED_FORMAT_VERSION:
        raise EvaluateError(
            f"{cfg_path}: format_version {cfg['format_version']} is newer than this reader "
            f"(supports <= {SUPPORTED_FORMAT_VERSION}); upgrade scpretrain")
    family = cfg["model_family"]
    if family not in FAMILIES:
        raise EvaluateError(f"{cfg_path}: field 'model_family' is {family!r}; "
                            f"expected one of {sorted(FAMILIES)}")
    if cfg["embedding_key"] != embedding_key(family):
        raise EvaluateError(f"{cfg_path}: field 'embedding_key' is {cfg['embedding_key']!r}; "
                            f"a {family} export uses {embedding_key(family)!r}")
    if cfg["model"].get("n_genes") != cfg["n_genes"]:
        raise EvaluateError(f"{cfg_path}: field 'model.n_genes' is {cfg['model'].get('n_genes')!r} but "
                            f"field 'n_genes' is {cfg['n_genes']}; the file was edited by hand, "
                            "re-export the model")
    return cfg


def _read_spec(cfg: dict, cfg_path: Path) -> PreprocessSpec:
    try:
        spec = PreprocessSpec.from_dict(cfg["preprocessing"])
    except (TypeError, ValueError) as e:
        raise EvaluateError(f"{cfg_path}: field 'preprocessing': {e}") from e
    kind, pad = _FAMILY_INPUT[cfg["model_family"]]
    if spec.kind != kind or (kind == "bins" and spec.append_pad != pad):
        raise EvaluateError(
            f"{cfg_path}: field 'preprocessing' is {spec.to_dict()} but a {cfg['model_family']} encoder "
            f"takes kind={kind!r}" + (f", append_pad={pad}" if kind == "bins" else "")
            + "; re-export the model")
    return spec


def _read_vocab(path: Path, cfg: dict) -> list[tuple[str, str]]:
    vocab_path = path / VOCAB_FILE
    try:
        vocab = parse_vocab(vocab_path.read_text(encoding="utf-8"), str(vocab_path))
    except (ValueError, UnicodeDecodeError) as e:
        raise EvaluateError(f"{e}; restore vocab.tsv from the original export") from None
    if len(vocab) != cfg["n_genes"]:
        raise EvaluateError(f"{vocab_path}: {len(vocab)} genes but config.json field 'n_genes' is "
                            f"{cfg['n_genes']}; the export is incomplete or mixed from two exports, "
                            "re-export the model")
    digest = vocab_sha256([g for g, _ in vocab])
    if digest != cfg["vocab_sha256"]:
        raise EvaluateError(
            f"{vocab_path}: sha256 {digest[:12]}… of the gene ids does not match config.json field "
            f"'vocab_sha256' {cfg['vocab_sha256'][:12]}…; vocab.tsv was edited or belongs to another "
            "export: restore it from the original export (the model's input columns would otherwise be "
            "misread)")
    return vocab


def _alias_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Keys of the module's state dict that name the same tensor.

    performer-pytorch keeps a second reference to its layers (the projection updater),
    so one weight appears under two keys; an export may store either or both.
    """
    groups: dict[tuple, list[str]] = {}
    for k, t in state.items():
        if t.numel() == 0:  # empty tensors may all report data_ptr 0: never aliases
            groups[(k,)] = [k]
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        groups.setdefault(ident, []).append(k)
    return list(groups.values())


def _load_weights(module: nn.Module, weights_path: Path) -> None:
    """Strict load: every tensor of the module present once (up to aliases), nothing extra, shapes equal."""
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise EvaluateError(f"{weights_path}: not a readable safetensors file ({e}); re-export the model"
                            ) from e
    expected = module.state_dict()
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise EvaluateError(f"{weights_path}: {len(unexpected)} tensor(s) the {module.family} model does not "
                            f"have, e.g. {unexpected[:3]}; config.json field 'model' does not describe these "
                            "weights, re-export the model")
    full: dict[str, torch.Tensor] = {}
    for group in _alias_groups(expected):
        present = [k for k in group if k in stored]
        if not present:
            missing = [g[0] for g in _alias_groups(expected) if not any(k in stored for k in g)]
            raise EvaluateError(f"{weights_path}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}; the "
                                "file is incomplete or from another model, re-export the model")
        for k in group:
            full[k] = stored[present[0]]
    for k, t in full.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise EvaluateError(f"{weights_path}: tensor {k!r} has shape {tuple(t.shape)} but config.json "
                                f"field 'model' gives {tuple(expected[k].shape)}; the weights and "
                                "config.json come from different models, re-export the model")
    module.load_state_dict(full, strict=True)


def load_export(path: str | Path) -> Export:
    """Load an export directory into a frozen encoder (eval mode, CPU, gradients off).

    Checks config.json fields, the vocabulary hash against vocab.tsv and the weight names
    and shapes (strict); each refusal names the file, the field and the fix.
    """
    path = Path(path)
    if not path.is_dir():
        raise EvaluateError(f"{path}: not a directory; pass the export directory written by "
                            "`python -m train export`")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise EvaluateError(f"{path / name}: missing; an export needs {', '.join(REQUIRED_FILES)} "
                                "(write one with `python -m train export CHECKPOINT --out DIR`)")
    cfg = _read_config(path)
    spec = _read_spec(cfg, path / "config.json")
    vocab = _read_vocab(path, cfg)
    try:
        module = build_model(cfg["model_family"], dict(cfg["model"]))
    except (TypeError, ValueError) as e:
        raise EvaluateError(f"{path / 'config.json'}: field 'model': {e}") from e
    _load_weights(module, path / "model.safetensors")
    module.eval()
    module.requires_grad_(False)  # the encoder stays frozen downstream; heads train on its embeddings
    return Export(path=path, family=cfg["model_family"], module=module, vocab=vocab, preprocessing=spec,
                  config=cfg, weights_sha256=file_sha256(path / "model.safetensors"))
