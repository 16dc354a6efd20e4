"""Fine-tune a classifier: a head on the frozen encoder, or the head with part or all of the encoder.

Class-weighted cross-entropy by default (rare cell types count as much as common ones,
as in the MAE reference's downstream protocol; ``loss="ce"`` and the long-tail options
``loss="gaussian_inflation"`` and ``hard_mining=True`` are described in
``evaluate.longtail``), early stopping on a stratified validation split of the training
cells, and the same result for the same seed: the split, the initialization, the batch
order, dropout and the inflation noise all draw from RNGs seeded here.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scpretrain.evaluate.align import align_to_vocab
from scpretrain.evaluate.classifier import Classifier, resolve_kind
from scpretrain.evaluate.embedding import as_export, embed_counts, pick_device
from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.export_io import Export
from scpretrain.evaluate.heads import HEAD_KINDS, Head
from scpretrain.evaluate.longtail import (
    Criterion,
    LongTail,
    class_weights,  # noqa: F401  (importable from here, as before)
    make_criterion,
    mine_hard,
)
from scpretrain.evaluate.options import FitOptions, ReadOptions, split_options


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted index arrays (kept, held_out): ``round(fraction * n_c)`` cells of each class held out.

    Each class with at least two cells gives at least one cell to each side, so every
    class is both learned and scored; a class with a single cell stays on the kept side.
    """
    if not 0.0 < fraction < 1.0:
        raise EvaluateError(f"split fraction must be between 0 and 1 (exclusive), got {fraction}")
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for cls in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == cls)
        if len(idx) < 2:
            continue
        n_held = min(max(int(round(fraction * len(idx))), 1), len(idx) - 1)
        held.append(rng.permutation(idx)[:n_held])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_out)
    return kept, held_out


def labels_of(adata: Any, label_key: str, name: str = "reference") -> tuple[np.ndarray, np.ndarray]:
    """(string labels of the labelled cells, their row indices); unlabelled (NaN) cells are skipped."""
    if label_key not in adata.obs.columns:
        cols = ", ".join(map(str, list(adata.obs.columns)[:10]))
        raise EvaluateError(f"{name}: obs has no column {label_key!r} (columns: {cols or 'none'}); "
                            "pass --label-key with the column that holds the cell types")
    col = adata.obs[label_key]
    keep = np.flatnonzero(~pd.isna(col).to_numpy())
    labels = col.iloc[keep].astype(str).to_numpy()
    if len(set(labels.tolist())) < 2:
        raise EvaluateError(f"{name}: obs[{label_key!r}] has {len(set(labels.tolist()))} distinct label(s) "
                            f"among {len(labels)} labelled cells; a classifier needs at least 2")
    return labels, keep


def _batches(idx: np.ndarray, size: int) -> list[np.ndarray]:
    return [idx[i:i + size] for i in range(0, len(idx), size)]


@dataclass
class Trainee:
    """What the training loop drives: ``step_logits(rows)`` -> logits of those cells (training or evaluation
    mode as ``set_mode`` last set), and ``snapshot`` / ``restore`` of the state to keep the best epoch's."""

    step_logits: Callable[[np.ndarray], torch.Tensor]
    set_mode: Callable[[bool], None]
    snapshot: Callable[[], dict]
    restore: Callable[[dict], None]


def _train(
    t: Trainee,
    param_groups: list[dict],
    y: torch.Tensor,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    criterion: Criterion,
    *,
    batch_size: int,
    max_epochs: int,
    patience: int,
    weight_decay: float,
    seed: int,
    eval_batch_size: int = 8192,
    sample_weight: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The one training loop: AdamW on ``criterion``, early stopping on its validation loss.

    Keeps the best epoch's state of ``t``. Batch order comes from a generator
    seeded with ``seed``; the caller seeds torch's RNG (initialization, dropout, inflation noise).
    ``sample_weight`` [n_cells] (hard mining) weights each training cell's loss.
    """
    step_logits, set_mode, snapshot, restore = t.step_logits, t.set_mode, t.snapshot, t.restore
    criterion = criterion.to(y.device)
    opt = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best_loss, best_state, best_epoch, epoch = float("inf"), snapshot(), 0, 0
    for epoch in range(1, max_epochs + 1):
        set_mode(True)
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        for b in _batches(order, batch_size):
            opt.zero_grad(set_to_none=True)
            sw = None if sample_weight is None else sample_weight[torch.as_tensor(b, device=y.device)]
            criterion(step_logits(b), y[b], sw).backward()
            opt.step()
        if len(val_idx) == 0:  # too few cells to hold any out: train the full budget
            best_state, best_epoch = snapshot(), epoch
            continue
        set_mode(False)
        with torch.no_grad():
            logits = torch.cat([step_logits(b) for b in _batches(val_idx, eval_batch_size)])
            val_loss = float(criterion.validation(logits, y[val_idx]))
        if val_loss < best_loss - 1e-6:
            best_loss, best_state, best_epoch = val_loss, snapshot(), epoch
        elif epoch - best_epoch >= patience:
            break
    restore(best_state)
    set_mode(False)
    return {"n_train": int(len(train_idx)), "n_val": int(len(val_idx)), "best_epoch": best_epoch,
            "epochs_run": epoch, "best_val_loss": None if best_loss == float("inf") else best_loss,
            "seed": seed, "weight_decay": weight_decay, "batch_size": batch_size,
            "class_weighted": criterion.class_weight is not None, "loss": criterion.name}


def _train_phases(
    t: Trainee,
    param_groups: list[dict],
    y: torch.Tensor,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    classes: list[str],
    longtail: LongTail,
    **train_kw: Any,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Phase 1 with ``longtail.loss``; with ``longtail.hard_mining`` phase 2 on the mined hard cells.

    Returns (training info, the hard training cells as row indices, or None without mining).
    """
    y_np = y.cpu().numpy()
    criterion = make_criterion(longtail, y_np[train_idx], len(classes))
    info = _train(t, param_groups, y, train_idx, val_idx, criterion, **train_kw)
    info["longtail"] = longtail.describe()
    if not longtail.hard_mining:
        return info, None
    t.set_mode(False)
    bs = train_kw.get("eval_batch_size", 8192)
    with torch.no_grad():
        proba = torch.cat([torch.softmax(t.step_logits(b), dim=1).float().cpu()
                           for b in _batches(train_idx, bs)]).numpy()
    hard = train_idx[mine_hard(proba, y_np[train_idx], longtail.hard_margin)]
    weight = torch.ones(len(y_np), dtype=torch.float32, device=y.device)
    weight[torch.as_tensor(hard, device=y.device)] = longtail.hard_weight
    groups = [{**g, "lr": g["lr"] * longtail.hard_lr_scale} for g in param_groups]
    phase2 = _train(t, groups, y, train_idx, val_idx, criterion, sample_weight=weight, **train_kw)
    info["hard_mining"] = {
        "n_hard": int(len(hard)),
        "n_hard_per_class": {classes[c]: int(n) for c, n in zip(*np.unique(y_np[hard], return_counts=True))},
        "phase1_best_val_loss": info["best_val_loss"], "best_val_loss": phase2["best_val_loss"],
        "best_epoch": phase2["best_epoch"], "epochs_run": phase2["epochs_run"]}
    return info, hard


def _encode_labels(labels: Any) -> tuple[np.ndarray, list[str], np.ndarray]:
    labels = np.asarray(labels).astype(str)
    classes = sorted(set(labels.tolist()))
    return labels, classes, np.searchsorted(np.asarray(classes), labels)


def fit_head(
    embeddings: np.ndarray,
    labels: np.ndarray,
    kind: str = "linear",
    *,
    hidden: int = 128,
    dropout: float | None = None,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    max_epochs: int = 300,
    patience: int = 20,
    val_fraction: float = 0.15,
    seed: int = 0,
    export_info: dict | None = None,
    loss: str = "weighted_ce",
    hard_mining: bool = False,
    inflation_sigma: float | None = None,
    inflation_gamma: float = 0.0,
    hard_margin: float = 0.2,
    hard_weight: float = 4.0,
    hard_lr_scale: float = 0.3,
) -> Head:
    """Train a ``kind`` ("linear" | "mlp") head on cell embeddings [n, d] with string labels [n].

    Stops when the validation loss has not improved for ``patience`` epochs and keeps the
    best epoch's weights. ``lr`` defaults to 1e-2 for the linear probe and 3e-3 for the MLP
    (inputs are standardized, so one default fits most encoders). Runs on the CPU: heads
    are small. ``loss`` ("weighted_ce", "ce", "gaussian_inflation"), ``hard_mining``,
    ``inflation_sigma``, ``inflation_gamma``, ``hard_margin``, ``hard_weight`` and ``hard_lr_scale``:
    see ``evaluate.longtail``. With hard mining the head's ``hard_cells`` are the mined rows of ``labels``.
    """
    longtail = LongTail(loss=loss, hard_mining=hard_mining, inflation_sigma=inflation_sigma,
                        inflation_gamma=inflation_gamma, hard_margin=hard_margin, hard_weight=hard_weight,
                        hard_lr_scale=hard_lr_scale)
    if kind not in ("linear", "mlp"):
        raise EvaluateError(f"head: {kind!r} on embeddings must be 'linear' or 'mlp' (the scbert head reads "
                            "per-gene representations: use fit_classifier)")
    lr = lr if lr is not None else (1e-2 if kind == "linear" else 3e-3)
    labels, classes, y_all = _encode_labels(labels)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    y = torch.as_tensor(y_all, dtype=torch.long)
    with torch.random.fork_rng(devices=[]):  # seed locally: the caller's RNG state is left as it was
        torch.manual_seed(seed)
        head = Head(x.shape[1], classes, kind=kind, hidden=hidden, dropout=dropout, export_info=export_info)
        head.set_standardization(x[train_idx])
        trainee = Trainee(lambda b: head(x[b]), head.train, lambda: copy.deepcopy(head.state_dict()),
                          head.load_state_dict)
        info, hard = _train_phases(
            trainee, [{"params": list(head.parameters()), "lr": lr}], y, train_idx, val_idx, classes,
            longtail, batch_size=batch_size, max_epochs=max_epochs, patience=patience,
            weight_decay=weight_decay, seed=seed)
    head.eval()
    head.training_info = {**info, "lr": lr}
    head.hard_cells = hard
    return head


# defaults by where the gradient stops: head-only training on cached embeddings is cheap, every
# epoch through the encoder is not
_FROZEN_EMB = dict(lr={"linear": 1e-2, "mlp": 3e-3}, batch_size=128, max_epochs=300, patience=20)
_THROUGH_ENCODER = dict(lr={"linear": 1e-2, "mlp": 3e-3, "scbert": 1e-3}, batch_size=32, max_epochs=50,
                        patience=5)


# long: the closures below share one training state (encoder, head, cache, best snapshot); as separate
# functions they would pass all of it around.
def fit_classifier(
    model: Export,
    counts: sp.csr_matrix,
    labels: Any,
    head: str = "auto",
    mode: str = "frozen",
    unfreeze: int | list[int] = 1,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    batch_size: int = 512,
    fit: FitOptions | None = None,
    **options: Any,
) -> Classifier:
    """Fine-tune a classifier on aligned raw counts [n, n_genes] (``align_to_vocab``) with labels [n].

    ``head``: "auto" (the family's reference head: scbert for a Performer, linear for an
    MAE), "linear", "mlp" or "scbert". ``mode``: "frozen", "partial" (the last
    ``unfreeze`` blocks, plus a Performer's final norm) or "full" (see
    ``evaluate.classifier``). The head learns at ``lr`` (linear 1e-2, mlp 3e-3, scbert
    1e-3), the encoder at ``encoder_lr`` (1e-4, scBERT's fine-tuning rate). Batches of
    ``train_batch_size`` (128 on frozen embeddings, else 32) for at most ``max_epochs``
    (300 / 50), stopping ``patience`` (20 / 5) epochs after the best validation loss.
    Frozen scbert features are computed once when they fit in ``cache_bytes``.
    ``batch_size`` is the inference batch. Same seed, same classifier (on one device).
    ``loss`` ("weighted_ce" default, "ce", "gaussian_inflation"), ``hard_mining``, ``inflation_sigma``,
    ``inflation_gamma``, ``hard_margin``, ``hard_weight``, ``hard_lr_scale``: the long-tail options of
    ``evaluate.longtail``. All of these come as ``fit`` (``evaluate.FitOptions``) or as keyword arguments.
    """
    fit = FitOptions.of("fit_classifier", fit, options)
    longtail = fit.longtail()
    hidden, dropout, lr, encoder_lr, weight_decay = fit.hidden, fit.dropout, fit.lr, fit.encoder_lr, fit.weight_decay
    train_batch_size, max_epochs, patience = fit.train_batch_size, fit.max_epochs, fit.patience
    val_fraction, cache_bytes = fit.val_fraction, fit.cache_bytes
    kind = resolve_kind(head, model.family)
    if kind not in HEAD_KINDS:
        raise EvaluateError(f"head: {head!r} is not one of {('auto', *HEAD_KINDS)}")
    if counts.shape[0] != len(labels):
        raise EvaluateError(f"fine-tuning: {counts.shape[0]} cells of counts but {len(labels)} labels")
    frozen_emb = mode == "frozen" and kind != "scbert"
    d = _FROZEN_EMB if frozen_emb else _THROUGH_ENCODER
    lr = d["lr"][kind] if lr is None else lr
    train_kw = dict(batch_size=train_batch_size or d["batch_size"], max_epochs=max_epochs or d["max_epochs"],
                    patience=patience or d["patience"], weight_decay=weight_decay)
    head_kw = dict(hidden=hidden, dropout=dropout, export_info=export_info(model))
    if frozen_emb:  # the cheap path: embed once, train the head on the embeddings
        emb = embed_counts(model, counts, batch_size=batch_size, device=device)
        trained = fit_head(emb, labels, kind, lr=lr, val_fraction=val_fraction, seed=seed, **head_kw,
                           **train_kw, **longtail.kwargs())
        trained.fine_tuning = {"mode": "frozen", "unfreeze": None, "encoder_tensors": []}
        return Classifier(export=model, head=trained, encoder=model.module, mode="frozen")
    labels, classes, y_all = _encode_labels(labels)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    dev = pick_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dim = model.module.cfg.dim if model.family == "performer" else model.module.cfg.latent
        h = Head(dim, classes, kind=kind, seq_len=model.n_genes + 1 if kind == "scbert" else None, **head_kw)
        clf = Classifier.create(model, h, mode, unfreeze).to(dev)
        feats = _prepare(clf, counts, train_idx, batch_size, cache_bytes, dev)
        params = dict(clf.encoder.named_parameters())
        groups = [{"params": list(h.parameters()), "lr": lr}]
        if clf.tuned:
            groups.append({"params": [params[n] for n in clf.tuned], "lr": encoder_lr})

        def step_logits(b: np.ndarray) -> torch.Tensor:
            if feats is not None:
                return h(feats[torch.as_tensor(b, device=feats.device)])
            return clf.logits(clf.inputs(counts, b, dev))

        def set_mode(training: bool) -> None:
            h.train(training)
            clf.encoder.train(training and mode != "frozen")

        def snapshot() -> dict:
            return {"head": copy.deepcopy(h.state_dict()),
                    "encoder": {n: params[n].detach().clone() for n in clf.tuned}}

        def restore(state: dict) -> None:
            h.load_state_dict(state["head"])
            with torch.no_grad():
                for n, t in state["encoder"].items():
                    params[n].copy_(t)

        y = torch.as_tensor(y_all, dtype=torch.long, device=dev)
        info, hard = _train_phases(Trainee(step_logits, set_mode, snapshot, restore), groups, y, train_idx,
                                   val_idx, classes, longtail, seed=seed, eval_batch_size=batch_size, **train_kw)
    clf.encoder.requires_grad_(False)
    h.training_info = {**info, "lr": lr, "encoder_lr": encoder_lr if clf.tuned else None, "mode": mode}
    h.hard_cells = hard
    return clf


@torch.no_grad()
def _prepare(clf: Classifier, counts: sp.csr_matrix, train_idx: np.ndarray, batch_size: int, cache_bytes: int,
             dev: torch.device) -> torch.Tensor | None:
    """Before any update: standardize a linear/mlp head with the training cells' embeddings; for a
    frozen scbert head, return every cell's per-gene representations when they fit in ``cache_bytes``
    (they never change, so the encoder runs once instead of every epoch)."""
    clf.encoder.eval()
    if clf.kind != "scbert":
        clf.head.set_standardization(torch.cat([clf.features(clf.inputs(counts, b, dev)).cpu()
                                                for b in _batches(train_idx, batch_size)]))
        return None
    seq_len, dim = clf.head.input_shape
    if clf.mode != "frozen" or counts.shape[0] * seq_len * dim * 4 > cache_bytes:
        return None
    return torch.cat([clf.features(clf.inputs(counts, slice(i, i + batch_size), dev))
                      for i in range(0, counts.shape[0], batch_size)])


def export_info(model: Export) -> dict:
    return {"path": str(model.path), "family": model.family, "embedding_key": model.embedding_key,
            "vocab_sha256": model.vocab_sha256, "weights_sha256": model.weights_sha256}


def finetune(
    model: Export | str | Path,
    reference: Any,
    label_key: str,
    head: str = "auto",
    *,
    mode: str = "frozen",
    unfreeze: int | list[int] = 1,
    save_to: str | Path | None = None,
    seed: int = 0,
    read: ReadOptions | None = None,
    fit: FitOptions | None = None,
    **options: Any,
) -> Classifier:
    """Fine-tune a classifier on the labelled cells of ``reference``; returns it.

    ``head``: "auto" (scbert for a Performer export, linear for an MAE export), "linear",
    "mlp" or "scbert". ``mode``: "frozen" (only the head trains), "partial" (the last
    ``unfreeze`` encoder blocks too, plus a Performer's final norm) or "full". ``fit``
    (``evaluate.FitOptions``, or its fields as keyword arguments) trains it, e.g. the long-tail options
    ``loss="gaussian_inflation"`` and ``hard_mining=True`` (``evaluate.longtail``). With
    ``save_to`` the head (and the fine-tuned encoder tensors) are written there:
    head.safetensors + head.json (+ encoder.safetensors); reuse with
    ``annotate(..., head=save_to)``. ``read``: how the reference is read (``evaluate.ReadOptions``).
    """
    read, fit = split_options("finetune", read, fit, options)  # a misspelt option stops here, before any work
    verbose = read.verbose
    model = as_export(model)
    labels, rows = labels_of(reference, label_key)
    counts, _ = align_to_vocab(reference, model.vocab, layer=read.layer, name="reference", **read.align())
    clf = fit_classifier(model, counts[rows], labels, head, mode, unfreeze, seed=seed, device=read.device,
                         batch_size=read.batch_size, fit=fit)
    if verbose:
        info = clf.head.training_info
        print(f"{clf.describe()}: {len(clf.classes)} classes, {info['n_train']} training / {info['n_val']} "
              f"validation cells, best epoch {info['best_epoch']} of {info['epochs_run']}, "
              f"loss {info['loss']}")
        if "hard_mining" in info:
            hm = info["hard_mining"]
            print(f"hard mining: {hm['n_hard']} hard training cells weighted "
                  f"{info['longtail']['hard_weight']}x; second phase best epoch {hm['best_epoch']} of "
                  f"{hm['epochs_run']}")
    if save_to is not None:
        clf.save(save_to)
        if verbose:
            print(f"head saved to {save_to}")
    return clf
