"""Fit a classification head on frozen embeddings.

Class-weighted cross-entropy (rare cell types count as much as common ones, as in the
MAE reference's downstream protocol), early stopping on a stratified validation split
of the training cells, and the same result for the same seed: the split, the
initialization, the batch order and dropout all draw from RNGs seeded here.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from evaluate.embedding import as_export, compute_embeddings
from evaluate.errors import EvaluateError
from evaluate.export_io import Export
from evaluate.heads import HEAD_KINDS, Head


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


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """n / (n_classes * count_c); classes absent from y get weight 0 (they contribute no loss anyway)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def fit_head(
    embeddings: np.ndarray,
    labels: np.ndarray,
    kind: str = "linear",
    *,
    hidden: int = 128,
    dropout: float = 0.1,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    max_epochs: int = 300,
    patience: int = 20,
    val_fraction: float = 0.15,
    seed: int = 0,
    export_info: dict | None = None,
) -> Head:
    """Train a ``kind`` ("linear" | "mlp") head on embeddings [n, d] with string labels [n].

    Stops when the class-weighted validation loss has not improved for ``patience`` epochs
    and keeps the best epoch's weights. ``lr`` defaults to 1e-2 for the linear probe and
    3e-3 for the MLP (inputs are standardized, so one default fits most encoders). Runs on
    the CPU: heads are small.
    """
    if kind not in HEAD_KINDS:
        raise EvaluateError(f"head: {kind!r} is not one of {HEAD_KINDS}")
    lr = lr if lr is not None else (1e-2 if kind == "linear" else 3e-3)
    labels = np.asarray(labels).astype(str)
    classes = sorted(set(labels.tolist()))
    y_all = np.searchsorted(np.asarray(classes), labels)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
    y = torch.as_tensor(y_all, dtype=torch.long)
    weights = class_weights(y_all[train_idx], len(classes))
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    with torch.random.fork_rng(devices=[]):  # seed locally: the caller's RNG state is left as it was
        torch.manual_seed(seed)
        head = Head(x.shape[1], classes, kind=kind, hidden=hidden, dropout=dropout, export_info=export_info)
        head.set_standardization(x[train_idx].numpy())
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        best_loss, best_state, best_epoch, epoch = float("inf"), copy.deepcopy(head.state_dict()), 0, 0
        for epoch in range(1, max_epochs + 1):
            head.train()
            order = torch.as_tensor(train_idx)[torch.randperm(len(train_idx), generator=gen)]
            for start in range(0, len(order), batch_size):
                b = order[start:start + batch_size]
                opt.zero_grad(set_to_none=True)
                loss_fn(head(x[b]), y[b]).backward()
                opt.step()
            if len(val_idx) == 0:  # too few cells to hold any out: train the full budget
                best_state, best_epoch = copy.deepcopy(head.state_dict()), epoch
                continue
            head.eval()
            with torch.no_grad():
                val_loss = float(loss_fn(head(x[val_idx]), y[val_idx]))
            if val_loss < best_loss - 1e-6:
                best_loss, best_state, best_epoch = val_loss, copy.deepcopy(head.state_dict()), epoch
            elif epoch - best_epoch >= patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    head.training_info = {
        "n_train": int(len(train_idx)), "n_val": int(len(val_idx)), "best_epoch": best_epoch,
        "epochs_run": epoch, "best_val_loss": None if best_loss == float("inf") else best_loss, "seed": seed,
        "lr": lr, "weight_decay": weight_decay, "class_weighted": True}
    return head


def export_info(model: Export) -> dict:
    return {"path": str(model.path), "family": model.family, "embedding_key": model.embedding_key,
            "vocab_sha256": model.vocab_sha256, "weights_sha256": model.weights_sha256}


def finetune(
    model: Export | str | Path,
    reference: Any,
    label_key: str,
    head: str = "linear",
    *,
    save_to: str | Path | None = None,
    layer: str | None = None,
    min_coverage: float = 0.5,
    batch_size: int = 512,
    device: str | None = None,
    seed: int = 0,
    verbose: bool = True,
    **fit_kwargs: Any,
) -> Head:
    """Fine-tune a ``head`` ("linear" | "mlp") on the frozen embeddings of a labelled AnnData.

    The encoder stays frozen; only the head trains (see ``fit_head`` for the keyword
    arguments). With ``save_to`` the head is written there as head.safetensors + head.json.
    """
    model = as_export(model)
    labels, rows = labels_of(reference, label_key)
    emb, _ = compute_embeddings(model, reference, batch_size=batch_size, layer=layer,
                                min_coverage=min_coverage, device=device, name="reference", verbose=verbose)
    trained = fit_head(emb[rows], labels, kind=head, seed=seed, export_info=export_info(model), **fit_kwargs)
    if verbose:
        info = trained.training_info
        print(f"head ({head}): {len(trained.classes)} classes, {info['n_train']} training / {info['n_val']} "
              f"validation cells, best epoch {info['best_epoch']} of {info['epochs_run']}")
    if save_to is not None:
        trained.save(save_to)
        if verbose:
            print(f"head saved to {save_to}")
    return trained
