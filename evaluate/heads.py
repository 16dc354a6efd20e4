"""Classification heads on frozen embeddings, saved as safetensors + JSON.

A head standardizes its input with the training embeddings' mean and std (kept as
buffers, so a saved head carries them) and then applies a linear probe or a
one-hidden-layer MLP. The JSON side records the classes and dimensions, and the
export the head was trained on, so it is never applied to another encoder's embeddings.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from evaluate.errors import EvaluateError

HEAD_FORMAT_VERSION = 1
HEAD_KINDS = ("linear", "mlp")
WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "head.json"


class Head(nn.Module):
    """Logits over ``classes`` from an embedding [B, in_dim]."""

    def __init__(self, in_dim: int, classes: list[str], kind: str = "linear", hidden: int = 128,
                 dropout: float = 0.1, export_info: dict | None = None):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise EvaluateError(f"head: kind {kind!r} is not one of {HEAD_KINDS}")
        self.kind, self.in_dim, self.hidden, self.dropout = kind, int(in_dim), int(hidden), float(dropout)
        self.classes = [str(c) for c in classes]
        # which encoder produced the training embeddings: family, embedding_key, vocab and weights hashes
        self.export_info = dict(export_info or {})
        self.training_info: dict[str, Any] = {}
        self.register_buffer("mean", torch.zeros(self.in_dim))
        self.register_buffer("std", torch.ones(self.in_dim))
        n = len(self.classes)
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(self.in_dim, n))
        else:
            self.net = nn.Sequential(nn.Linear(self.in_dim, self.hidden), nn.ReLU(), nn.Dropout(self.dropout),
                                     nn.Linear(self.hidden, n))

    def set_standardization(self, embeddings: np.ndarray) -> None:
        with torch.no_grad():
            x = torch.as_tensor(embeddings, dtype=torch.float32)
            self.mean.copy_(x.mean(0))
            # constant dimensions would divide by zero; leaving them unscaled is harmless
            self.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net((z - self.mean) / self.std)

    @torch.no_grad()
    def predict_proba(self, embeddings: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Softmax probabilities [n, n_classes] (columns in ``self.classes`` order)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.in_dim:
            raise EvaluateError(f"head: embeddings have shape {embeddings.shape}, the head expects "
                                f"[n, {self.in_dim}]; use the export the head was trained on")
        was_training = self.training
        self.eval()
        out = [torch.softmax(self(torch.as_tensor(embeddings[i:i + batch_size], dtype=torch.float32)), dim=1)
               for i in range(0, len(embeddings), batch_size)]
        self.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), np.float32)

    def check_compatible(self, export: Any) -> None:
        """Refuse embeddings from another encoder than the one this head was trained on."""
        for key, have in (("family", export.family), ("vocab_sha256", export.vocab_sha256),
                          ("weights_sha256", export.weights_sha256)):
            want = self.export_info.get(key)
            if want and have and want != have:
                raise EvaluateError(
                    f"head: trained on an export with {key} {str(want)[:12]}…, but {export.path} has "
                    f"{str(have)[:12]}…; fine-tune a new head on this export (python -m evaluate finetune)")

    def config(self) -> dict:
        return {"format_version": HEAD_FORMAT_VERSION, "kind": self.kind, "in_dim": self.in_dim,
                "n_classes": len(self.classes), "classes": self.classes, "hidden": self.hidden,
                "dropout": self.dropout, "export": self.export_info, "training": self.training_info}

    def save(self, directory: str | Path) -> Path:
        """Write ``head.safetensors`` and ``head.json`` into ``directory`` (created if needed)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        # temp file + rename: a crash never leaves a half-written head next to a valid one
        tmp_w, tmp_c = d / f".{WEIGHTS_FILE}.tmp", d / f".{CONFIG_FILE}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp_w),
                  metadata={"kind": self.kind})
        tmp_c.write_text(json.dumps(self.config(), indent=2))
        os.replace(tmp_w, d / WEIGHTS_FILE)
        os.replace(tmp_c, d / CONFIG_FILE)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "Head":
        """Reload a head written by :meth:`save` (safetensors + JSON only)."""
        d = Path(directory)
        cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise EvaluateError(f"{p}: missing; save a head with "
                                    f"`python -m evaluate finetune ... --out {d}`")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise EvaluateError(f"{cfg_path}: not valid JSON ({e}); save the head again") from e
        for name in ("kind", "in_dim", "classes"):
            if name not in cfg:
                raise EvaluateError(f"{cfg_path}: field {name!r} is missing; save the head again")
        if cfg.get("format_version", 1) > HEAD_FORMAT_VERSION:
            raise EvaluateError(f"{cfg_path}: format_version {cfg['format_version']} is newer than this "
                                "reader; upgrade scpretrain")
        head = cls(cfg["in_dim"], cfg["classes"], kind=cfg["kind"], hidden=cfg.get("hidden", 128),
                   dropout=cfg.get("dropout", 0.1), export_info=cfg.get("export"))
        head.training_info = cfg.get("training", {})
        with safe_open(str(w_path), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise EvaluateError(f"{w_path}: does not match {cfg_path} fields kind/in_dim/classes ({e}); "
                                "save the head again") from e
        return head.eval()
