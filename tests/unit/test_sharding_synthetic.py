"""The synthetic atlas: deterministic, independent of how it is split into blocks, realistic enough."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scpretrain.sharding.errors import InputError
from scpretrain.sharding.synthetic import SyntheticAtlas, SyntheticParams

SPEC = "synthetic://cells=2500,genes=300,types=5,datasets=3,seed=7"


def test_parse_defaults_and_errors() -> None:
    p = SyntheticParams.parse(SPEC)
    assert (p.cells, p.genes, p.types, p.datasets, p.seed, p.density) == (2500, 300, 5, 3, 7, 0.05)
    assert SyntheticParams.parse("synthetic://") == SyntheticParams()
    with pytest.raises(InputError, match="unknown key 'cell'; allowed: cells, genes"):
        SyntheticParams.parse("synthetic://cell=5")
    with pytest.raises(InputError, match="genes='x' is not a number"):
        SyntheticParams.parse("synthetic://genes=x")


def test_blocks_are_independent_of_the_split() -> None:
    atlas = SyntheticAtlas(SyntheticParams.parse(SPEC))
    whole, obs = atlas.generate(0, 2000)
    first, obs1 = atlas.generate(0, 1000)
    second, obs2 = atlas.generate(1000, 2000)
    assert (sp.vstack([first, second]) != whole).nnz == 0
    assert obs1.index.tolist() + obs2.index.tolist() == obs.index.tolist()
    odd, _ = atlas.generate(333, 1777)  # not aligned to the generator's internal units
    assert (odd != whole[333:1777]).nnz == 0
    again, obs_again = SyntheticAtlas(SyntheticParams.parse(SPEC)).generate(0, 2000)
    assert (again != whole).nnz == 0 and obs_again.equals(obs)
    other, _ = SyntheticAtlas(SyntheticParams.parse(SPEC.replace("seed=7", "seed=8"))).generate(0, 2000)
    assert (other != whole).nnz > 0


def test_counts_look_like_an_atlas() -> None:
    atlas = SyntheticAtlas(SyntheticParams.parse(SPEC))
    x, obs = atlas.generate(0, 2500)
    assert x.dtype == np.float32 and np.all(x.data == np.round(x.data)) and x.data.min() > 0
    assert 0.03 < x.nnz / (x.shape[0] * x.shape[1]) < 0.08  # ~5% requested
    assert set(obs.columns) == {"cell_type", "dataset_id", "donor_id"}
    assert obs["dataset_id"].iloc[0] == "synthetic_0" and obs["dataset_id"].iloc[-1] == "synthetic_2"
    assert obs["cell_type"].str.fullmatch(r"type_0[0-4]").all()
    # cell types differ in expression: the mean profiles of two types are far apart
    norm = sp.diags(1.0 / np.maximum(np.asarray(x.sum(axis=1)).ravel(), 1.0)) @ x
    means = {t: np.asarray(norm[(obs["cell_type"] == t).to_numpy()].mean(axis=0)).ravel()
             for t in obs["cell_type"].value_counts().index[:2]}
    a, b = means.values()
    assert np.abs(np.log1p(a * 1e4) - np.log1p(b * 1e4)).max() > 1.0
    # datasets have different compositions
    comp = obs.groupby("dataset_id")["cell_type"].value_counts(normalize=True).unstack(fill_value=0)
    assert (comp.max(axis=0) - comp.min(axis=0)).max() > 0.1


def test_sparse_sampler_matches_the_dense_one() -> None:
    """At low density the O(nnz) sampler is used; it draws the same NB counts (other random streams)."""
    spec = "synthetic://cells=30000,genes=300,types=4,datasets=2,density=0.02,seed=3"
    sparse_atlas = SyntheticAtlas(SyntheticParams.parse(spec))
    dense_atlas = SyntheticAtlas(SyntheticParams.parse(spec))
    dense_atlas.sparse = False
    assert sparse_atlas.sparse
    xs, obs_s = sparse_atlas.generate(0, 30000)
    xd, obs_d = dense_atlas.generate(0, 30000)
    assert obs_s.equals(obs_d)  # cell types, datasets, donors and library sizes are drawn identically
    assert xs.dtype == np.float32 and xs.has_sorted_indices and np.all(xs.data == np.round(xs.data))
    assert xs.data.min() >= 1 and abs(xs.nnz - xd.nnz) / xd.nnz < 0.02
    hist_s = np.bincount(xs.data.astype(int), minlength=6)[1:6] / xs.nnz
    hist_d = np.bincount(xd.data.astype(int), minlength=6)[1:6] / xd.nnz
    np.testing.assert_allclose(hist_s, hist_d, atol=0.01)
    nz_s, nz_d = (np.asarray((x > 0).mean(axis=0)).ravel() for x in (xs, xd))
    assert np.abs(nz_s - nz_d).max() < 0.015
    top = np.argsort(-np.asarray(xd.mean(axis=0)).ravel())[:10]
    var_ratio = xs[:, top].toarray().var(axis=0) / xd[:, top].toarray().var(axis=0)
    assert np.all((var_ratio > 0.85) & (var_ratio < 1.15))  # the NB over-dispersion is kept
    part, _ = sparse_atlas.generate(333, 1777)
    assert (part != xs[333:1777]).nnz == 0
