"""A synthetic single-cell atlas, generated block by block in bounded memory.

The model, in the usual generative shape of scRNA-seq counts:

* a shared baseline expression profile over genes, lognormal (a few genes dominate);
* per cell type, a gene programme: a set of marker genes up-regulated several-fold;
* per dataset, a batch effect (a lognormal multiplicative factor per gene) and its
  own cell-type composition (Dirichlet); datasets are contiguous runs of cells, as in
  a real concatenated atlas, so an un-shuffled corpus would be badly ordered;
* per cell, a lognormal library size, calibrated so the expected share of non-zeros
  matches ``density``;
* counts are negative binomial: Poisson(Gamma(1/phi, mu*phi)) with dispersion phi.

Cells are generated in fixed units of ``UNIT`` rows, each from its own RNG stream
seeded by (seed, unit index), so any range [start, stop) is identical however the
caller splits it, and 20M cells stream with memory bounded by one unit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sharding.errors import InputError

UNIT = 256
PREFIX = "synthetic://"
_DISPERSION = 0.3
_LIB_SIGMA = 0.5
_MARKER_FOLD = np.log(6.0)


@dataclass(frozen=True)
class SyntheticParams:
    cells: int = 10_000
    genes: int = 2_000
    types: int = 12
    datasets: int = 4
    seed: int = 0
    density: float = 0.05

    @classmethod
    def parse(cls, spec: str) -> "SyntheticParams":
        """``synthetic://cells=50000,genes=2000,types=12,datasets=4,seed=0,density=0.05``, keys optional."""
        body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, float | int] = {}
        for item in filter(None, body.split(",")):
            key, _, raw = item.partition("=")
            key = key.strip()
            if key not in types:
                raise InputError(f"{spec}: unknown key {key!r}; allowed: {', '.join(types)}")
            try:
                values[key] = float(raw) if key == "density" else int(raw)
            except ValueError:
                raise InputError(f"{spec}: {key}={raw!r} is not a number; e.g. {key}=1000") from None
        params = cls(**values)  # type: ignore[arg-type]
        if min(params.cells, params.genes, params.types, params.datasets) < 1:
            raise InputError(f"{spec}: cells, genes, types and datasets must be >= 1")
        if not 0 < params.density < 0.9:
            raise InputError(f"{spec}: density={params.density} must be in (0, 0.9)")
        return params


class SyntheticAtlas:
    """Deterministic generator: ``generate(start, stop)`` -> (CSR counts float32, obs)."""

    def __init__(self, params: SyntheticParams):
        self.params = p = params
        rng = np.random.default_rng([p.seed, 0])
        baseline = rng.lognormal(0.0, 1.5, size=p.genes)
        logfold = np.zeros((p.types, p.genes))
        n_markers = max(3, p.genes // 40)
        for t in range(p.types):
            markers = rng.choice(p.genes, size=min(n_markers, p.genes), replace=False)
            logfold[t, markers] = rng.normal(_MARKER_FOLD, 0.5, size=markers.size)
        batch = rng.lognormal(0.0, 0.35, size=(p.datasets, p.genes))
        rates = baseline * np.exp(logfold)[None, :, :] * batch[:, None, :]  # (datasets, types, genes)
        self.rates = rates / rates.sum(axis=2, keepdims=True)
        self.composition_cdf = np.cumsum(rng.dirichlet(np.full(p.types, 0.7), size=p.datasets), axis=1)
        self.donors = rng.integers(2, 7, size=p.datasets)
        self.log_lib_mean = _calibrate_library(self.rates, p.density)

    def generate(self, start: int, stop: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
        """Cells [start, stop): the same values however the range is split across calls."""
        stop = min(stop, self.params.cells)
        if stop <= start:
            empty = np.zeros(0, dtype=np.int64)
            empty_counts = sp.csr_matrix((0, self.params.genes), dtype=np.float32)
            return empty_counts, self._obs(empty, empty, empty, empty)
        mats, parts = [], []
        for unit in range(start // UNIT, (stop - 1) // UNIT + 1):
            u0 = unit * UNIT
            counts, cols = self._unit(unit)
            lo, hi = max(start, u0) - u0, min(stop, u0 + UNIT) - u0
            mats.append(counts[lo:hi])
            parts.append([c[lo:hi] for c in cols])
        cell = np.arange(start, stop)
        ds, ct, donor = (np.concatenate([p[i] for p in parts]) for i in range(3))
        return sp.vstack(mats, format="csr"), self._obs(cell, ds, ct, donor)

    def _unit(self, unit: int) -> tuple[sp.csr_matrix, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        p = self.params
        rng = np.random.default_rng([p.seed, 1, unit])
        cell = np.arange(unit * UNIT, min((unit + 1) * UNIT, p.cells))
        ds = cell * p.datasets // p.cells  # datasets are contiguous runs, as in a concatenated atlas
        ct = (rng.random(cell.size)[:, None] > self.composition_cdf[ds]).sum(axis=1)
        ct = np.minimum(ct, p.types - 1)
        donor = (rng.random(cell.size) * self.donors[ds]).astype(np.int64)
        lib = np.exp(rng.normal(self.log_lib_mean, _LIB_SIGMA, size=cell.size))
        mu = lib[:, None] * self.rates[ds, ct]
        lam = rng.gamma(1.0 / _DISPERSION, mu * _DISPERSION)
        counts = rng.poisson(lam).astype(np.float32)
        return sp.csr_matrix(counts), (ds, ct, donor)

    def _obs(self, cell: np.ndarray, ds: np.ndarray, ct: np.ndarray, donor: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(
            {"cell_type": [f"type_{t:02d}" for t in ct],
             "dataset_id": [f"synthetic_{d}" for d in ds],
             "donor_id": [f"synthetic_{d}_donor_{k}" for d, k in zip(ds, donor)]},
            index=pd.Index([f"cell_{i}" for i in cell]),
        )


def _calibrate_library(rates: np.ndarray, density: float) -> float:
    """Log mean library size giving the expected non-zero share ``density`` (bisection, deterministic)."""
    profiles = rates.reshape(-1, rates.shape[-1])
    # a spread of (dataset, type) profiles is enough to estimate the share; keeps 20k-gene atlases fast
    profiles = profiles[np.linspace(0, len(profiles) - 1, min(len(profiles), 16)).astype(int)]
    z = np.linspace(-2.0, 2.0, 9)  # library-size quantiles in standard deviations

    def nonzero_share(log_mean: float) -> float:
        lib = np.exp(log_mean + _LIB_SIGMA * z)
        mu = lib[:, None, None] * profiles[None]
        p_zero = (1.0 + _DISPERSION * mu) ** (-1.0 / _DISPERSION)
        return float(1.0 - p_zero.mean())

    lo, hi = np.log(1.0), np.log(1e8)
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if nonzero_share(mid) < density else (lo, mid)
    return 0.5 * (lo + hi)
