"""Classification heads, saved as safetensors + JSON.

Three kinds:

* ``linear`` — the MAE reference's downstream head: one linear layer on the cell
  embedding (standardized with the training embeddings' mean and std, kept as
  buffers so a saved head carries them; an affine map, so still a linear probe);
* ``mlp`` — the same input, one hidden layer;
* ``scbert`` — the scBERT fine-tuning head, on the *per-gene* representations
  [B, G+1, dim] of a Performer encoder: a width-1 convolution folds each position's
  ``dim`` features into one channel, then ReLU, Linear(G+1 -> 512), ReLU,
  Linear(512 -> 128), ReLU, Linear(128 -> n_classes).

The JSON side records the classes and dimensions, the export the head was trained
on (so it is never applied to another encoder's outputs) and, when the encoder was
fine-tuned too, which encoder tensors were replaced (see ``evaluate.classifier``).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from scpretrain.evaluate.errors import EvaluateError
from scpretrain.scmodels.atomic import write_folder

HEAD_FORMAT_VERSION = 1
HEAD_KINDS = ("linear", "mlp", "scbert")
WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "head.json"
SCBERT_HIDDEN = (512, 128)  # the reference head's two hidden widths



def save_folder(directory: str | Path, marker: str, what: str, write: Callable[[Path], None]) -> Path:
    """``scmodels.atomic.write_folder`` with its refusals as one-line ``EvaluateError``s."""
    try:
        return write_folder(Path(directory), marker, what, write)
    except FileExistsError as e:
        raise EvaluateError(str(e)) from None
    except OSError as e:
        raise EvaluateError(f"{directory}: cannot write the {what} ({e}); pass another --out") from e

def read_saved(directory: str | Path, what: str, how: str, config_file: str = CONFIG_FILE,
               weights_file: str = WEIGHTS_FILE) -> tuple[Path, dict, Path, dict[str, torch.Tensor]]:
    """(config path, config, weights path, tensors) of a saved head's folder (JSON and safetensors only). A
    missing or unreadable file is refused naming it; ``how`` says how to write one."""
    d = Path(directory)
    cfg_path, w_path = d / config_file, d / weights_file
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise EvaluateError(f"{p}: missing; save a {what} with {how.format(d=d)}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise EvaluateError(f"{cfg_path}: not valid JSON ({e}); save the {what} again") from e
    try:
        with safe_open(str(w_path), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise EvaluateError(f"{w_path}: not a readable safetensors file ({e}); save the {what} again") from e
    return cfg_path, cfg, w_path, state


class ScBertNet(nn.Module):
    """Per-gene representations [B, seq_len, dim] -> logits [B, n_classes] (scBERT's head)."""

    def __init__(self, seq_len: int, dim: int, n_classes: int, dropout: float = 0.0):
        super().__init__()
        # kernel size 1 over positions == one shared dim -> 1 projection per gene position
        self.conv = nn.Conv1d(dim, 1, kernel_size=1)
        h1, h2 = SCBERT_HIDDEN
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(seq_len, h1), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(h1, h2), nn.ReLU(), nn.Dropout(dropout), nn.Linear(h2, n_classes))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.conv(h.transpose(1, 2)).squeeze(1))


class Head(nn.Module):
    """Logits over ``classes``: from a cell embedding [B, in_dim] (linear, mlp) or from per-gene
    representations [B, seq_len, in_dim] (scbert)."""

    def __init__(self, in_dim: int, classes: list[str], kind: str = "linear", hidden: int = 128,
                 dropout: float | None = None, export_info: dict | None = None, seq_len: int | None = None):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise EvaluateError(f"head: kind {kind!r} is not one of {HEAD_KINDS}")
        if kind == "scbert" and not seq_len:
            raise EvaluateError("head: the scbert head needs seq_len (the encoder's n_genes + 1 positions)")
        # the reference heads: dropout 0.1 in the MLP, none in scBERT's (it fine-tuned with dropout 0)
        dropout = (0.0 if kind == "scbert" else 0.1) if dropout is None else float(dropout)
        self.kind, self.in_dim, self.hidden, self.dropout = kind, int(in_dim), int(hidden), dropout
        self.seq_len = int(seq_len) if kind == "scbert" else None
        self.classes = [str(c) for c in classes]
        # which encoder produced the training inputs: family, embedding_key, vocab and weights hashes
        self.export_info = dict(export_info or {})
        self.training_info: dict[str, Any] = {}
        # how the encoder was treated (mode, unfrozen tensors); filled in by evaluate.classifier
        self.fine_tuning: dict[str, Any] = {"mode": "frozen"}
        # rows of the training labels that hard mining picked (evaluate.longtail); not saved
        self.hard_cells: np.ndarray | None = None
        n = len(self.classes)
        if kind == "scbert":
            self.net = ScBertNet(self.seq_len, self.in_dim, n, self.dropout)
            return
        self.register_buffer("mean", torch.zeros(self.in_dim))
        self.register_buffer("std", torch.ones(self.in_dim))
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(self.in_dim, n))
        else:
            self.net = nn.Sequential(nn.Linear(self.in_dim, self.hidden), nn.ReLU(), nn.Dropout(self.dropout),
                                     nn.Linear(self.hidden, n))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input row: (in_dim,) or (seq_len, in_dim)."""
        return (self.seq_len, self.in_dim) if self.kind == "scbert" else (self.in_dim,)

    def set_standardization(self, embeddings: np.ndarray | torch.Tensor) -> None:
        if self.kind == "scbert":  # its inputs come out of the encoder's final LayerNorm already
            return
        with torch.no_grad():
            x = torch.as_tensor(embeddings, dtype=torch.float32)
            self.mean.copy_(x.mean(0))
            # constant dimensions would divide by zero; leaving them unscaled is harmless
            self.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "scbert":
            return self.net(z)
        return self.net((z - self.mean) / self.std)

    @torch.no_grad()
    def predict_proba(self, inputs: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Softmax probabilities [n, n_classes] (columns in ``self.classes`` order)."""
        inputs = np.asarray(inputs)
        if inputs.shape[1:] != self.input_shape:
            raise EvaluateError(f"head: inputs have shape {inputs.shape}, the head expects "
                                f"[n, {', '.join(map(str, self.input_shape))}]; use the export the head was "
                                "trained on")
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = [torch.softmax(self(torch.as_tensor(inputs[i:i + batch_size], dtype=torch.float32, device=dev)),
                             dim=1).cpu()
               for i in range(0, len(inputs), batch_size)]
        self.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes)), np.float32)

    def check_compatible(self, export: Any) -> None:
        """Refuse an encoder other than the one this head was trained on."""
        for key, have in (("family", export.family), ("vocab_sha256", export.vocab_sha256),
                          ("weights_sha256", export.weights_sha256)):
            want = self.export_info.get(key)
            if want and have and want != have:
                raise EvaluateError(
                    f"head: trained on an export with {key} {str(want)[:12]}…, but {export.path} has "
                    f"{str(have)[:12]}…; fine-tune a new head on this export (python -m evaluate finetune)")
        if self.kind == "scbert" and export.n_genes + 1 != self.seq_len:
            raise EvaluateError(f"head: a scbert head over {self.seq_len} positions, but {export.path} has "
                                f"{export.n_genes} genes (+1); use the export the head was trained on")

    def config(self) -> dict:
        cfg = {"format_version": HEAD_FORMAT_VERSION, "kind": self.kind, "in_dim": self.in_dim,
               "n_classes": len(self.classes), "classes": self.classes, "hidden": self.hidden,
               "dropout": self.dropout, "export": self.export_info, "training": self.training_info,
               "fine_tuning": self.fine_tuning}
        if self.kind == "scbert":
            cfg.update(seq_len=self.seq_len, scbert_hidden=list(SCBERT_HIDDEN))
        return cfg

    def save(self, directory: str | Path) -> Path:
        """Write ``head.safetensors`` and ``head.json`` as the folder ``directory``, replaced in one step
        (a crash never leaves new weights beside an old config)."""
        return save_folder(directory, CONFIG_FILE, "head", self.write_files)

    def write_files(self, d: Path) -> None:
        """head.safetensors + head.json into the folder ``d`` (``save`` swaps that folder into place)."""
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(d / WEIGHTS_FILE),
                  metadata={"kind": self.kind})
        (d / CONFIG_FILE).write_text(json.dumps(self.config(), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> Head:
        """Reload a head written by :meth:`save` (safetensors + JSON only)."""
        cfg_path, cfg, w_path, state = read_saved(directory, "head", "`python -m evaluate finetune ... --out {d}`")
        for name in ("kind", "in_dim", "classes"):
            if name not in cfg:
                raise EvaluateError(f"{cfg_path}: field {name!r} is missing; save the head again")
        if cfg.get("format_version", 1) > HEAD_FORMAT_VERSION:
            raise EvaluateError(f"{cfg_path}: format_version {cfg['format_version']} is newer than this "
                                "reader; upgrade scpretrain")
        if cfg["kind"] not in HEAD_KINDS:
            raise EvaluateError(f"{cfg_path}: field 'kind' is {cfg['kind']!r}, not one of {HEAD_KINDS}; "
                                "save the head again")
        head = cls(cfg["in_dim"], cfg["classes"], kind=cfg["kind"], hidden=cfg.get("hidden", 128),
                   dropout=cfg.get("dropout"), export_info=cfg.get("export"), seq_len=cfg.get("seq_len"))
        head.training_info = cfg.get("training", {})
        head.fine_tuning = cfg.get("fine_tuning", {"mode": "frozen"})
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise EvaluateError(f"{w_path}: does not match {cfg_path} fields kind/in_dim/classes ({e}); "
                                "save the head again") from e
        return head.eval()
