"""An export's encoder plus a head: what ``finetune`` trains and ``annotate`` applies.

Fine-tuning modes:

* ``frozen`` — only the head trains; the encoder is the export's, untouched.
* ``partial`` — the last ``unfreeze`` blocks train with the head, plus the final
  LayerNorm for a Performer (scBERT's fine-tuning recipe: everything frozen but the
  final norm and one layer). A block is a Performer layer (attention + feed-forward)
  or, for an MAE, one Linear layer of the encoder (``unfreeze=1`` trains the final
  Linear -> latent only). ``unfreeze`` may also be a list of block indices:
  ``[-2]`` is literally what the scBERT code unfreezes (its ``layers[-2]``).
* ``full`` — every encoder weight that pretraining trained (a Performer's gene
  embedding stays frozen when its config says so, as in pretraining; the
  reconstruction output and the MAE decoder are not on the classification path).

A classifier never changes the export's module: unfrozen modes train a copy. Saved
next to the head (``encoder.safetensors``) are only the tensors that trained, by the
export's own names; everything else is read from the export on load, whose weights
hash the head records, so a head is never combined with another export.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from scpretrain.evaluate.embedding import pick_device
from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.export_io import Export
from scpretrain.evaluate.heads import CONFIG_FILE as HEAD_CONFIG
from scpretrain.evaluate.heads import Head, save_folder
from scpretrain.scmodels import preprocess
from scpretrain.scmodels.atomic import file_sha256

MODES = ("frozen", "partial", "full")
ENCODER_FILE = "encoder.safetensors"


def resolve_kind(kind: str, family: str) -> str:
    """``auto`` -> the family's reference head (scbert for a Performer, linear for an MAE); checks others."""
    if kind == "auto":
        return "scbert" if family == "performer" else "linear"
    if kind == "scbert" and family != "performer":
        raise EvaluateError(f"head: the scbert head reads per-gene representations, which a {family} export "
                            "does not have; use head 'linear' (the MAE reference's) or 'mlp'")
    return kind


def encoder_blocks(module: nn.Module) -> list[nn.Module]:
    """The units ``partial`` unfreezes, first to last: Performer layers, or the MAE encoder's Linears."""
    if module.family == "performer":
        return list(module.performer.net.layers)
    return [m for m in module.encoder if isinstance(m, nn.Linear)]


def trainable_names(module: nn.Module, mode: str, unfreeze: int | list[int] = 1) -> list[str]:
    """Names (as in ``module.named_parameters()``) of the encoder parameters ``mode`` trains."""
    if mode not in MODES:
        raise EvaluateError(f"fine-tuning mode {mode!r} is not one of {MODES}")
    if mode == "frozen":
        return []
    if mode == "full":
        if module.family == "performer":
            skip = ("to_out.",) + (("gene_emb.",) if module.cfg.freeze_gene_embedding else ())
            return [n for n, _ in module.named_parameters() if not n.startswith(skip)]
        return [n for n, _ in module.named_parameters() if n.startswith("encoder.")]
    blocks = encoder_blocks(module)
    if isinstance(unfreeze, int):
        if not 1 <= unfreeze <= len(blocks):
            raise EvaluateError(f"unfreeze={unfreeze}: the {module.family} encoder has {len(blocks)} "
                                f"block(s); pass 1..{len(blocks)} (or mode 'full')")
        picked = blocks[-unfreeze:]
    else:
        try:
            picked = [blocks[i] for i in unfreeze]
        except IndexError:
            raise EvaluateError(f"unfreeze={list(unfreeze)}: the {module.family} encoder has {len(blocks)} "
                                f"block(s), indices -{len(blocks)}..{len(blocks) - 1}") from None
    if module.family == "performer":
        picked = [*picked, module.norm]
    ids = {id(p) for b in picked for p in b.parameters()}
    return [n for n, p in module.named_parameters() if id(p) in ids]


def _redraw_free_copy(module: nn.Module) -> nn.Module:
    """A trainable copy; a Performer's FAVOR+ projections stay the exported ones (no redraws while training,
    so the head learns on the features the saved encoder will produce)."""
    enc = copy.deepcopy(module)
    if enc.family == "performer":
        enc.cfg = dataclasses.replace(enc.cfg, feature_redraw_interval=0)
    return enc


@dataclass
class Classifier:
    """``encoder`` (the export's module when frozen, else a fine-tuned copy) followed by ``head``."""

    export: Export
    head: Head
    encoder: nn.Module
    mode: str = "frozen"
    tuned: list[str] = field(default_factory=list)  # encoder parameters that trained

    @classmethod
    def create(cls, export: Export, head: Head, mode: str = "frozen",
               unfreeze: int | list[int] = 1) -> Classifier:
        """Wrap ``export`` for training in ``mode``: the parameters to train have requires_grad set."""
        names = trainable_names(export.module, mode, unfreeze)
        if mode == "frozen":
            encoder = export.module
        else:
            encoder = _redraw_free_copy(export.module)
            params = dict(encoder.named_parameters())
            for n in names:
                params[n].requires_grad_(True)
        head.fine_tuning = {"mode": mode, "unfreeze": unfreeze if mode == "partial" else None,
                            "encoder_tensors": names}
        return cls(export=export, head=head, encoder=encoder, mode=mode, tuned=names)

    @property
    def classes(self) -> list[str]:
        return self.head.classes

    @property
    def kind(self) -> str:
        return self.head.kind

    def inputs(self, counts: sp.csr_matrix, rows: np.ndarray | slice, device: torch.device) -> torch.Tensor:
        """Model inputs for the cells ``rows`` of aligned raw counts, preprocessed as the export says."""
        dense = torch.from_numpy(np.asarray(counts[rows].toarray(), dtype=np.float32)).to(device)
        return preprocess(dense, self.export.preprocessing)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input: per-gene representations (scbert) or the cell embedding."""
        return self.encoder.hidden(x) if self.kind == "scbert" else self.encoder.encode(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def to(self, device: torch.device) -> Classifier:
        self.encoder.to(device)
        self.head.to(device)
        return self

    @torch.inference_mode()
    def predict(self, counts: sp.csr_matrix, batch_size: int = 512,
                device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [n, n_classes], cell embeddings [n, d] of this classifier's encoder).

        ``counts``: raw counts aligned to the export's vocabulary (``evaluate.align.align_to_vocab``).
        When the encoder is frozen the embeddings equal the export's (``evaluate.embed``).
        """
        dev = pick_device(device)
        self.to(dev)
        self.encoder.eval()
        self.head.eval()
        probs, embs = [], []
        for start in range(0, counts.shape[0], batch_size):
            feats = self.features(self.inputs(counts, slice(start, start + batch_size), dev))
            probs.append(torch.softmax(self.head(feats), dim=1).float().cpu())
            # the scbert head reads per-gene representations; the cell embedding is their mean over the gene
            # positions (the appended pad excluded), exactly PerformerEncoder.encode
            embs.append((feats[:, :-1].mean(dim=1) if self.kind == "scbert" else feats).float().cpu())
        if not probs:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, 0), np.float32)
        return torch.cat(probs).numpy(), torch.cat(embs).numpy()

    # --- persistence -----------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """head.safetensors + head.json, plus encoder.safetensors with the tensors that trained (if any)."""
        def write(d: Path) -> None:
            if self.tuned:
                params = dict(self.encoder.named_parameters())
                save_file({n: params[n].detach().to("cpu", torch.float32).contiguous() for n in self.tuned},
                          str(d / ENCODER_FILE), metadata={"mode": self.mode})
                self.head.fine_tuning["encoder_sha256"] = file_sha256(d / ENCODER_FILE)
            self.head.write_files(d)

        return save_folder(directory, HEAD_CONFIG, "head", write)  # one folder, swapped in whole

    @classmethod
    def load(cls, directory: str | Path, export: Export) -> Classifier:
        """Reload a saved classifier onto ``export``; refuses any export but the one it was trained on."""
        d = Path(directory)
        head = Head.load(d)
        head.check_compatible(export)
        ft = head.fine_tuning or {"mode": "frozen"}
        mode, names = ft.get("mode", "frozen"), list(ft.get("encoder_tensors") or [])
        if mode not in MODES:
            raise EvaluateError(f"{d / 'head.json'}: field 'fine_tuning.mode' is {mode!r}, not one of "
                                f"{MODES}; save the head again")
        if not names:
            return cls(export=export, head=head, encoder=export.module, mode=mode, tuned=[])
        enc_path = d / ENCODER_FILE
        if not enc_path.is_file():
            raise EvaluateError(f"{enc_path}: missing; head.json says the encoder was fine-tuned "
                                f"({mode}), so its tensors must be saved beside the head: save it again")
        want = ft.get("encoder_sha256")
        if want and file_sha256(enc_path) != want:
            raise EvaluateError(f"{enc_path}: sha256 does not match head.json field "
                                "'fine_tuning.encoder_sha256'; the file belongs to another save of this "
                                "directory: save the head again")
        with safe_open(str(enc_path), framework="pt", device="cpu") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
        encoder = _redraw_free_copy(export.module)
        params = dict(encoder.named_parameters())
        if set(stored) != set(names) or not set(names) <= set(params):
            odd = sorted((set(stored) ^ set(names)) | (set(names) - set(params)))[:3]
            raise EvaluateError(f"{enc_path}: tensors {odd} do not match head.json field "
                                f"'fine_tuning.encoder_tensors' or the {export.family} model; "
                                "save the head again")
        with torch.no_grad():
            for n in names:
                if params[n].shape != stored[n].shape:
                    raise EvaluateError(f"{enc_path}: tensor {n!r} has shape {tuple(stored[n].shape)}, the "
                                        f"export's is {tuple(params[n].shape)}; save the head again")
                params[n].copy_(stored[n])
        encoder.eval()
        return cls(export=export, head=head, encoder=encoder, mode=mode, tuned=names)

    def describe(self) -> str:
        what = {"frozen": "frozen encoder", "full": "fully fine-tuned encoder",
                "partial": f"partly fine-tuned encoder ({len(self.tuned)} tensors)"}[self.mode]
        return f"{self.kind} head on the {what}"


def as_classifier(obj: Any, export: Export) -> Classifier:
    """A Classifier, a bare Head (trained on the export's embeddings) or a saved head's directory."""
    if isinstance(obj, Classifier):
        obj.head.check_compatible(export)
        return obj
    if isinstance(obj, Head):
        obj.check_compatible(export)
        return Classifier(export=export, head=obj, encoder=export.module, mode="frozen")
    return Classifier.load(obj, export)
