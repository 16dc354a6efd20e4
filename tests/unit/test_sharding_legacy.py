"""h5ad files written by anndata < 0.8 (as many published files are): categorical obs columns are int codes
with an object reference to ``obs/__categories/<col>``. The builder must read the category strings, not the
codes (the Kang 2018 file once came out with labels '0'..'7' and a holdout of 0 cells)."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from tests.conftest import run_cli


def legacy_h5ad(path: Path) -> None:
    rng = np.random.default_rng(0)
    n, g = 40, 12
    str_dt = h5py.special_dtype(vlen=str)
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=rng.poisson(2.0, (n, g)).astype(np.float32))  # dense, as the file ships
        var = f.create_group("var")
        var.attrs.update({"_index": "index", "encoding-type": "dataframe", "encoding-version": "0.1.0"})
        var.attrs.create("column-order", data=[], dtype=str_dt)
        var.create_dataset("index", data=np.array([f"GENE{i}" for i in range(g)], dtype=object), dtype=str_dt)
        obs = f.create_group("obs")
        obs.attrs.update({"_index": "index", "encoding-type": "dataframe", "encoding-version": "0.1.0"})
        obs.attrs.create("column-order", data=["stim", "label"], dtype=str_dt)
        obs.create_dataset("index", data=np.array([f"cell{i}" for i in range(n)], dtype=object), dtype=str_dt)
        cats = obs.create_group("__categories")
        for col, values in (("stim", ["CTRL", "STIM"]), ("label", ["B", "NK", "T"])):
            c = cats.create_dataset(col, data=np.array(values, dtype=object), dtype=str_dt)
            codes = obs.create_dataset(col, data=(np.arange(n) % len(values)).astype(np.int8))
            codes.attrs["categories"] = c.ref


def test_legacy_categoricals_read_as_strings_and_holdout_by_value(tmp_path):
    src = tmp_path / "legacy.h5ad"
    legacy_h5ad(src)
    out = tmp_path / "corpus"
    p = run_cli(["-m", "sharding", "build", "--source", str(src), "--keep-obs", "label,stim",
                 "--holdout", "stim=STIM", "--out", str(out), "--format", "zarr"])
    man = json.loads((out / "manifest.json").read_text())
    assert man["obs_categories"]["label"] == ["B", "NK", "T"]
    assert sorted(man["obs_categories"]["stim"]) == ["CTRL", "STIM"]
    assert "stim in ['STIM']: 20 cells" in p.stdout
