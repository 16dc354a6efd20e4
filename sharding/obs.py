"""The corpus's obs columns, derived per source from its own obs.

Every shard's obs has ``cell_id`` (int64) and the string columns ``dataset_id``,
``cell_type``, ``source``, ``split``, then any ``--keep-obs`` columns (as strings;
missing values become "unknown"). Which source column feeds each is decided once
per source, before any row is read, so a typo fails fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scpretrain.sharding.errors import InputError
from scpretrain.sharding.sources import Source
from scpretrain.sharding.validate import Holdout

FIXED_COLUMNS = ["cell_id", "dataset_id", "cell_type", "source", "split"]
UNKNOWN = "unknown"
_DERIVED = ("dataset_id", "cell_type", "source")


@dataclass
class ObsPlan:
    spec: str
    label_col: str | None
    dataset_col: str | None
    dataset_default: str
    keep: list[str]
    holdout: Holdout | None
    holdout_col: str | None  # a source column, when the holdout column is not an output column
    notes: list[str] = field(default_factory=list)
    held_out: set[str] = field(default_factory=set)  # values seen on the holdout side

    @property
    def read_columns(self) -> list[str]:
        cols = [self.label_col, self.dataset_col, self.holdout_col, *self.keep]
        return list(dict.fromkeys(c for c in cols if c))

    def derive(self, obs: pd.DataFrame, n: int) -> dict[str, np.ndarray]:
        """String columns for n rows, from the block's source obs."""
        dataset = _strings(obs[self.dataset_col]) if self.dataset_col else _full(n, self.dataset_default)
        out = {
            "dataset_id": dataset,
            "cell_type": _strings(obs[self.label_col]) if self.label_col else _full(n, UNKNOWN),
            "source": _full(n, self.spec),
        }
        for col in self.keep:
            out[col] = _strings(obs[col])
        out["split"] = _full(n, "train")
        if self.holdout is not None:
            col = self.holdout.column
            key = out[col] if col in out else _strings(obs[self.holdout_col])
            held = self.holdout.select(key)
            self.held_out.update(pd.unique(key[held]).tolist())
            out["split"] = np.where(held, "holdout", "train").astype(object)
        return out


def plan_obs(source: Source, *, keep: list[str], label_key: str | None, dataset_key: str | None,
             holdout: Holdout | None) -> ObsPlan:
    """Decide, for one source, which of its obs columns feed the corpus columns; refuse missing ones."""
    spec, avail = source.spec, set(source.obs_columns)
    notes = []
    label = label_key or "cell_type"
    label_col = label if label in avail else None
    if label_col is None:
        notes.append(f"{spec}: obs has no '{label}' column; cell_type is '{UNKNOWN}' for its cells")
    dataset = dataset_key or "dataset_id"
    dataset_col = dataset if dataset in avail else None
    default = source.dataset_default
    if dataset_col is None:
        notes.append(f"{spec}: obs has no '{dataset}' column; dataset_id is '{default}' for its cells")
    for col in keep:
        if col not in avail:
            raise InputError(f"{spec}: obs has no column '{col}' (from --keep-obs); available: "
                             f"{', '.join(sorted(avail)) or 'none'} (drop it from --keep-obs)")
    holdout_col = None
    if holdout is not None and holdout.column not in _DERIVED and holdout.column not in keep:
        if holdout.column not in avail:
            raise InputError(f"{spec}: obs has no column '{holdout.column}' (from --holdout); available: "
                             f"{', '.join(sorted(set(avail) | set(_DERIVED)))}")
        holdout_col = holdout.column
    return ObsPlan(spec, label_col, dataset_col, default, list(keep), holdout, holdout_col, notes)


def _strings(values: pd.Series) -> np.ndarray:
    s = pd.Series(np.asarray(values, dtype=object))
    return s.where(s.notna(), UNKNOWN).astype(str).to_numpy(dtype=object)


def _full(n: int, value: str) -> np.ndarray:
    return np.full(n, value, dtype=object)
