"""The options of a classifier's training, as one typed object (``FitOptions``).

``finetune``, ``annotate`` and ``report`` take ``fit=FitOptions(...)``, or the same names as keyword arguments,
turned into a ``FitOptions`` on entry: a misspelt option is refused there, naming it, before any cell is read.
``head``, ``mode``, ``unfreeze`` and ``seed`` stay arguments of their own (they choose what is trained).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.longtail import LongTail


@dataclass(frozen=True)
class FitOptions:
    """Training of a head (and, in mode partial/full, of encoder blocks). None: the default of where the
    gradient stops (``evaluate.finetune``: 1e-2 / 3e-3 / 1e-3 learning rates; 128-cell batches, 300 epochs,
    patience 20 on frozen embeddings; 32, 50 and 5 through the encoder)."""

    hidden: int = 128  # mlp head width
    dropout: float | None = None  # None: 0.1 (linear, mlp), 0 (scbert)
    lr: float | None = None
    encoder_lr: float = 1e-4
    weight_decay: float = 1e-4
    train_batch_size: int | None = None
    max_epochs: int | None = None
    patience: int | None = None
    val_fraction: float = 0.15  # held out of the training cells for early stopping
    cache_bytes: int = 2 << 30  # frozen scbert features cached in memory up to this size
    # long-tail options (evaluate.longtail)
    loss: str = "weighted_ce"
    hard_mining: bool = False
    inflation_sigma: float | None = None
    inflation_gamma: float = 0.0
    hard_margin: float = 0.2
    hard_weight: float = 4.0
    hard_lr_scale: float = 0.3

    def __post_init__(self) -> None:
        self.longtail()  # refuses impossible long-tail settings here, not after the embedding

    def longtail(self) -> LongTail:
        return LongTail(loss=self.loss, hard_mining=self.hard_mining, inflation_sigma=self.inflation_sigma,
                        inflation_gamma=self.inflation_gamma, hard_margin=self.hard_margin,
                        hard_weight=self.hard_weight, hard_lr_scale=self.hard_lr_scale)

    @classmethod
    def of(cls, where: str, fit: FitOptions | None, given: dict[str, Any]) -> FitOptions:
        """``fit`` (default: the defaults) with the keyword arguments ``given`` applied; an unknown name is
        refused, naming ``where`` and the names it takes."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise EvaluateError(f"{where}: unknown option(s) {unknown}; training options are {names} "
                                "(and head, mode, unfreeze, seed)")
        return replace(fit if fit is not None else cls(), **given)
