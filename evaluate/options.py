"""The options of ``evaluate``'s functions as two typed objects: how cells are read (``ReadOptions``) and how
a classifier trains (``FitOptions``).

``embed``, ``finetune``, ``annotate``, ``report`` and ``langcell_annotate`` take ``read=ReadOptions(...)`` and
(where they train) ``fit=FitOptions(...)``, or the same names as keyword arguments, sorted into the two objects
on entry (``split_options``): a misspelt option is refused there, naming it, before any cell is read. What a
function is about (``head``, ``mode``, ``threshold``, ...) stays an argument of its own.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from scpretrain.evaluate.errors import EvaluateError
from scpretrain.evaluate.longtail import LongTail


@dataclass(frozen=True)
class ReadOptions:
    """How cells are read and matched to an export's genes (``evaluate.align``), and where the encoder runs."""

    layer: str | None = None  # counts in adata.layers[layer] ("raw": adata.raw) instead of X
    min_coverage: float = 0.5  # refuse data with fewer of the export's genes
    allow_normalized: bool = False  # use X as it is when no matrix holds raw integer counts
    sum_duplicates: bool = False  # add up duplicated gene names instead of refusing them
    batch_size: int = 512  # cells per forward pass
    device: str | None = None  # default: cuda when available
    verbose: bool = True

    def align(self) -> dict[str, Any]:
        """``align_to_vocab``'s keyword arguments (beside the layer and the name)."""
        return {"min_coverage": self.min_coverage, "verbose": self.verbose,
                "allow_normalized": self.allow_normalized, "sum_duplicates": self.sum_duplicates}


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
        return split_options(where, None, fit, given, reads=False)[1]


def split_options(where: str, read: ReadOptions | None, fit: FitOptions | None, given: dict[str, Any],
                  reads: bool = True, fits: bool = True,
                  other_training: Sequence[str] = ()) -> tuple[ReadOptions, FitOptions]:
    """``read`` and ``fit`` (default: the defaults) with the keyword arguments ``given`` sorted into them by
    name; a name neither takes is refused here, naming ``where`` and the names it takes. ``other_training``:
    the names another trainer takes instead of ``FitOptions`` (accepted, left in ``given`` for the caller)."""
    r_names = [f.name for f in fields(ReadOptions)] if reads else []
    f_names = [f.name for f in fields(FitOptions)] if fits else list(other_training)
    unknown = sorted(set(given) - set(r_names) - set(f_names))
    if unknown:
        known = ("reading options " + str(r_names) if r_names else "") + (
            ("; " if r_names and f_names else "") + ("training options " + str(f_names) if f_names else ""))
        raise EvaluateError(f"{where}: unknown option(s) {unknown}; {known}")
    read = replace(read if read is not None else ReadOptions(), **{k: v for k, v in given.items() if k in r_names})
    fit_given = {k: v for k, v in given.items() if k in f_names} if fits else {}
    return read, replace(fit if fit is not None else FitOptions(), **fit_given)
