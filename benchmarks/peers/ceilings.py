"""Sequential-read ceilings on the same data (no shuffling, no batching logic): how fast the bytes
can become CSR (or COO) arrays at all. Run in the project's venv.

Spec ``mode``:
* ``h5py``: the uncompressed h5ad's X with h5py, ``rows`` rows per read -> CSR arrays;
* ``zarr``: our corpus's Zarr shards with zarr-python, ``rows`` rows per read -> CSR arrays;
* ``zarr-numcodecs``: the same chunk files decoded with numcodecs directly in a thread pool
  (``threads``), skipping zarr-python's codec pipeline -> CSR arrays;
* ``soma-arrow``: the corpus's TileDB-SOMA X read through Arrow tables, ``rows`` rows per
  read -> COO numpy arrays;
* ``densify``: the cost of densifying CSR batches to float32 [batch x genes] on the CPU (torch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _harness import Meter, run, versions


def _h5py(spec: dict, meter: Meter) -> None:
    import h5py

    rows = int(spec.get("rows", 32768))
    reuse = bool(spec.get("reuse"))  # read into two preallocated buffers: no fresh pages per read
    with h5py.File(spec["h5ad"], "r") as f:
        x = f["X"]
        meter.start()
        ptr = x["indptr"][:]
        n = len(ptr) - 1
        if reuse:
            most = int(max(ptr[min(lo + rows, n)] - ptr[lo] for lo in range(0, n, rows)))
            dbuf = np.empty(most, dtype=x["data"].dtype)
            ibuf = np.empty(most, dtype=x["indices"].dtype)
        for lo in range(0, n, rows):
            hi = min(lo + rows, n)
            a, b = int(ptr[lo]), int(ptr[hi])
            if reuse:
                x["data"].read_direct(dbuf, np.s_[a:b], np.s_[0:b - a])
                x["indices"].read_direct(ibuf, np.s_[a:b], np.s_[0:b - a])
                data, indices = dbuf[:b - a], ibuf[:b - a]
            else:
                data = x["data"][a:b]
                indices = x["indices"][a:b]
            _ = (ptr[lo:hi + 1] - a, indices, data)
            if meter.add(hi - lo):
                break


def _shards(corpus: Path) -> tuple[list[Path], str]:
    m = json.loads((corpus / "manifest.json").read_text())
    return [corpus / s["path"] for s in m["zarr"]["shards"]], m["zarr"]["codec"]


def _zarr(spec: dict, meter: Meter) -> None:
    import zarr

    rows = int(spec.get("rows", 65536))
    paths, _ = _shards(Path(spec["corpus"]))
    meter.start()
    for p in paths:
        g = zarr.open_group(str(p), mode="r")
        ptr = np.asarray(g["X/indptr"][:], dtype=np.int64)
        n = len(ptr) - 1
        for lo in range(0, n, rows):
            hi = min(lo + rows, n)
            a, b = int(ptr[lo]), int(ptr[hi])
            data = g["X/data"][a:b]
            indices = g["X/indices"][a:b]
            _ = (ptr[lo:hi + 1] - a, indices, data)
            if meter.add(hi - lo):
                return


def _codec(meta: dict):
    """The numcodecs codec for a 1-D zarr v3 array written as ``bytes`` (little endian) + one compressor."""
    import numcodecs

    codecs = meta["codecs"]
    if codecs[0]["name"] != "bytes" or len(codecs) > 2:
        raise ValueError(f"unsupported codec chain {codecs}")
    if len(codecs) == 1:
        return None
    name, conf = codecs[1]["name"], codecs[1].get("configuration", {})
    if name == "zstd":
        return numcodecs.Zstd(level=conf.get("level", 0))
    if name == "blosc":
        return numcodecs.Blosc(cname=conf.get("cname", "lz4"))  # decode reads the real settings from the header
    if name.startswith("numcodecs."):
        return numcodecs.get_codec({"id": name.split(".", 1)[1], **conf})
    raise ValueError(f"unsupported compressor {name}")


def _zarr_numcodecs(spec: dict, meter: Meter) -> None:
    from concurrent.futures import ThreadPoolExecutor

    paths, _ = _shards(Path(spec["corpus"]))
    pool = ThreadPoolExecutor(int(spec.get("threads", 2)))

    def read_array(adir: Path, dtype) -> np.ndarray:
        meta = json.loads((adir / "zarr.json").read_text())
        codec = _codec(meta)
        size, chunk = meta["shape"][0], meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        n = -(-size // chunk)

        def one(i: int) -> np.ndarray:
            raw = (adir / "c" / str(i)).read_bytes()
            return np.frombuffer(codec.decode(raw) if codec is not None else raw, dtype=dtype)

        parts = list(pool.map(one, range(n)))
        return np.concatenate(parts)[:size] if parts else np.zeros(0, dtype)

    meter.start()
    for p in paths:
        x = p / "X"
        ptr = read_array(x / "indptr", "<i8")
        indices = read_array(x / "indices", "<i4")
        data = read_array(x / "data", "<f4")
        _ = (ptr, indices, data)
        if meter.add(len(ptr) - 1):
            break
    pool.shutdown()


def _soma_arrow(spec: dict, meter: Meter) -> None:
    import pyarrow as pa
    import tiledbsoma

    rows = int(spec.get("rows", 65536))
    with tiledbsoma.Experiment.open(spec["soma"]) as exp:
        X = exp.ms["RNA"].X["raw"]
        n = exp.obs.count
        meter.start()
        for lo in range(0, n, rows):
            hi = min(lo + rows, n)
            tbl = pa.concat_tables(X.read(coords=(slice(lo, hi - 1),)).tables())
            _ = (tbl.column("soma_dim_0").to_numpy(), tbl.column("soma_dim_1").to_numpy(),
                 tbl.column("soma_data").to_numpy())
            if meter.add(hi - lo):
                break


def _densify(spec: dict, meter: Meter) -> None:
    import h5py
    import torch

    torch.set_num_threads(1)
    b = int(spec["batch_size"])
    with h5py.File(spec["h5ad"], "r") as f:
        x = f["X"]
        g = int(x.attrs["shape"][1])
        ptr = x["indptr"][: b + 1]
        a, z = int(ptr[0]), int(ptr[-1])
        indptr = torch.from_numpy(ptr - a)
        indices = torch.from_numpy(x["indices"][a:z].astype(np.int64))
        data = torch.from_numpy(x["data"][a:z])
    n = len(indptr) - 1
    rows = torch.repeat_interleave(torch.arange(n), indptr[1:] - indptr[:-1])
    meter.start()
    while True:
        dense = torch.zeros((n, g), dtype=torch.float32)
        dense[rows, indices] = data
        if meter.add(n):
            break


MODES = {"h5py": _h5py, "zarr": _zarr, "zarr-numcodecs": _zarr_numcodecs, "soma-arrow": _soma_arrow,
         "densify": _densify}


def main(spec: dict) -> None:
    meter = Meter(spec)
    if spec.get("warmup", True):  # one small read first: imports, thread pools and first opens are not timed
        meter._tick()
        MODES[spec["mode"]]({**spec, "cells": 1}, Meter({**spec, "result": None, "cells": 1}))
    MODES[spec["mode"]](spec, meter)
    meter.finish(versions=versions("h5py", "zarr", "numcodecs", "tiledbsoma", "pyarrow", "torch"))


if __name__ == "__main__":
    run(main)
