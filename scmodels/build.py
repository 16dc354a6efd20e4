"""Build a model from its family name and a flat hyperparameter dict (as stored in an export)."""
from __future__ import annotations

from dataclasses import asdict, fields

from torch import nn

from scpretrain.scmodels.mae import MAE, MAEConfig
from scpretrain.scmodels.performer import PerformerConfig, PerformerEncoder
from scpretrain.scmodels.preprocess import PreprocessSpec

FAMILIES = {"mae": (MAE, MAEConfig), "performer": (PerformerEncoder, PerformerConfig)}


def model_config(family: str, hparams: dict) -> MAEConfig | PerformerConfig:
    if family not in FAMILIES:
        raise ValueError(f"model_family: {family!r} is not one of {sorted(FAMILIES)}")
    cfg_cls = FAMILIES[family][1]
    names = {f.name for f in fields(cfg_cls)}
    unknown = set(hparams) - names
    if unknown:
        raise ValueError(f"model ({family}): unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(names)}")
    return cfg_cls(**hparams)


def build_model(family: str, hparams: dict) -> nn.Module:
    cls = FAMILIES[family][0] if family in FAMILIES else None
    cfg = model_config(family, hparams)
    return cls(cfg)


def hparams_of(model: nn.Module) -> dict:
    return asdict(model.cfg)


def default_preprocessing(family: str) -> PreprocessSpec:
    return PreprocessSpec(kind="bins", append_pad=True) if family == "performer" else PreprocessSpec(kind="log1p")


def embedding_key(family: str) -> str:
    return f"X_{family}"
