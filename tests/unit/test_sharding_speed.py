"""What makes a build fast stays correct: plain (unfiltered) h5ad arrays read straight from the file
(``sharding.sources.h5direct``) give the same rows as h5py for contiguous and chunked storage and any row range,
filtered storage falls back to h5py; the build restarts once with glibc's huge-page tunable."""
from __future__ import annotations

import os
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scpretrain.sharding.sources import open_sources
from scpretrain.sharding.sources.h5direct import direct


def _h5ad(path: Path, x: sp.csr_matrix, **dataset_kwargs) -> Path:
    a = anndata.AnnData(x, var=pd.DataFrame(index=[f"G{i}" for i in range(x.shape[1])]))
    a.write_h5ad(path, **dataset_kwargs)
    return path


@pytest.fixture(scope="module")
def counts() -> sp.csr_matrix:
    rng = np.random.default_rng(0)
    return sp.csr_matrix(rng.poisson(0.3, size=(500, 60)).astype(np.float32))


def _rechunk(src: Path, dst: Path, chunk: int) -> Path:
    """The same file with X's arrays chunked (as a file appended block by block is)."""
    with h5py.File(src) as f, h5py.File(dst, "w") as g:
        for key in f:
            f.copy(key, g)
        for k in ("data", "indices", "indptr"):
            values = f["X"][k][...]
            attrs = dict(g["X"][k].attrs)
            del g["X"][k]
            ds = g["X"].create_dataset(k, data=values, chunks=(min(chunk, len(values)),), maxshape=(None,))
            ds.attrs.update(attrs)
        for k, v in f.attrs.items():
            g.attrs[k] = v
    return dst


@pytest.mark.parametrize("layout", ["contiguous", "chunked", "gzip"])
def test_direct_reads_equal_h5py(counts, tmp_path, layout):
    path = _h5ad(tmp_path / "c.h5ad", counts, compression="gzip" if layout == "gzip" else None)
    if layout == "chunked":
        path = _rechunk(path, tmp_path / "k.h5ad", 97)
    [src] = open_sources([str(path)], matrix=None, vocab=None)
    try:
        reader = src._matrix
        assert (reader._direct is not None) == (layout != "gzip")
        for a, b in ((0, 1), (0, 500), (3, 97), (96, 98), (250, 499), (499, 500)):
            got = reader.rows(a, b)
            np.testing.assert_array_equal(got.toarray(), counts[a:b].toarray())
            assert got.shape == (b - a, 60) and got.nnz == counts[a:b].nnz
    finally:
        src.close()
    if layout != "gzip":
        assert reader._fd is None  # closed with the source


def test_filtered_or_unallocated_datasets_are_left_to_h5py(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("shuffled", data=np.arange(100, dtype=np.int32), chunks=(10,), shuffle=True)
        f.create_dataset("big_endian", data=np.arange(100, dtype=">i4"))
        f.create_dataset("empty", shape=(100,), dtype=np.int32, chunks=(10,))
        f.create_dataset("plain", data=np.arange(100, dtype=np.int32), chunks=(10,))
    fd = os.open(tmp_path / "f.h5", os.O_RDONLY)
    try:
        with h5py.File(tmp_path / "f.h5") as f:
            assert direct(fd, f["shuffled"]) is None
            assert direct(fd, f["big_endian"]) is None
            assert direct(fd, f["empty"]) is None
            arr = direct(fd, f["plain"])
            assert arr is not None and np.array_equal(arr.read(7, 93), np.arange(7, 93))
    finally:
        os.close(fd)


def test_a_truncated_file_is_an_input_error_naming_it(counts, tmp_path):
    from scpretrain.sharding.errors import InputError

    path = _h5ad(tmp_path / "t.h5ad", counts)
    [src] = open_sources([str(path)], matrix=None, vocab=None)
    try:
        assert src._matrix._direct is not None
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        with pytest.raises(InputError, match=r"t\.h5ad: cannot read X rows .*truncated or corrupt"):
            src._matrix.rows(0, 500)
    finally:
        src.close()


def test_a_build_restarts_once_with_huge_pages(monkeypatch, tmp_path):
    """``python -m sharding build`` replaces itself by the same command with glibc's hugetlb tunable (once:
    with the tunable present, or SCPRETRAIN_HUGEPAGES=0, nothing happens), and the restarted build works."""
    import sys

    from scpretrain.sharding import hugepages
    from tests.conftest import run_cli

    calls = []
    monkeypatch.setattr(hugepages.os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
    monkeypatch.setattr(hugepages.sys, "orig_argv", [sys.executable, "-m", "sharding", "build", "--out", "x"])
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("SCPRETRAIN_HUGEPAGES", raising=False)
    hugepages.restart_with_huge_pages()
    if hugepages._glibc_at_least(2, 35):
        [(exe, args, env)] = calls
        assert exe == sys.executable and args == [sys.executable, "-m", "sharding", "build", "--out", "x"]
        assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    hugepages.restart_with_huge_pages()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("SCPRETRAIN_HUGEPAGES", "0")
    hugepages.restart_with_huge_pages()
    assert len(calls) == (1 if hugepages._glibc_at_least(2, 35) else 0)
    out = tmp_path / "c"
    p = run_cli(["-m", "sharding", "build", "--source", "synthetic://cells=300,genes=50,types=2,datasets=1,seed=0",
                 "--out", str(out), "--no-progress"], env={"GLIBC_TUNABLES": "", "SCPRETRAIN_HUGEPAGES": "1"})
    assert p.returncode == 0 and (out / "manifest.json").is_file() and "of 300 cells" in p.stdout
