"""One Zarr shard = one AnnData Zarr v3 store, with X written by hand for explicit chunking.

obs and var go through ``anndata.io.write_elem`` so anndata reads them back as it
wrote them. X is written by hand (zarr writes its metadata, ``_write_chunks`` its
chunks) so that its arrays get the chunking the loader reads by (CHUNK_NNZ
non-zeros per chunk for data and indices, indptr in one chunk), the codec chosen
by measurement, no silently skipped chunks, and half the CPU cost of zarr-python's
codec pipeline.
"""

from __future__ import annotations

import json
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anndata
import numcodecs
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
import zarr.codecs as zc
from anndata.io import write_elem
from zarr.storage import MemoryStore

from scpretrain.sharding.errors import InputError

CHUNK_NNZ = 65_536
CODECS = ("zstd", "lz4", "blosc-zstd", "blosc-lz4")
X_DTYPES = ("auto", "float32")
X_ARRAYS = ("data", "indices", "indptr")


# each codec's settings, for zarr v3 (``make_codec``) and for numcodecs (``_numcodec``, the direct chunk
# writer): one table, so the two always write the same bytes. zstd level 1: 1.7x faster to encode int32
# indices than level 3, 4% larger, same decode speed.
_CODEC_ARGS: dict[str, dict[str, Any]] = {"zstd": {"level": 1}, "blosc-zstd": {"cname": "zstd", "clevel": 5},
                                          "blosc-lz4": {"cname": "lz4", "clevel": 5}, "lz4": {}}


def make_codec(name: str) -> Any:
    """The zarr v3 compressor for a codec name (``--codec``)."""
    if name not in _CODEC_ARGS:
        raise InputError(f"--codec {name!r}: expected one of {', '.join(CODECS)}")
    kw = _CODEC_ARGS[name]
    if name == "zstd":
        return zc.ZstdCodec(**kw)
    if name.startswith("blosc-"):
        return zc.BloscCodec(**kw, shuffle=zc.BloscShuffle.shuffle)
    # lz4 exists in zarr v3 only as a numcodecs wrapper; zarr warns that it is outside the
    # spec, which is known and accepted here (anndata/zarr-python read it back).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zc.LZ4()


def check_x_dtype(x_dtype: str) -> None:
    if x_dtype not in X_DTYPES:
        raise InputError(f"--x-dtype {x_dtype!r}: expected one of {', '.join(X_DTYPES)}")


def x_dtypes(csr: sp.csr_matrix, x_dtype: str = "auto") -> dict[str, np.dtype]:
    """The stored dtypes of X's arrays.

    ``auto``: gene indices as uint16 when the vocabulary has at most 65,536 genes (int32 beyond),
    counts as uint16 when every value is an integer of at most 65,535 (float32 otherwise, e.g.
    ``--allow-non-integer`` input or a very deep gene). Half the bytes of int32/float32 to store,
    decode and move; anndata reads them back as a scipy CSR with these dtypes.
    ``float32``: the classic int32 indices and float32 counts.
    """
    check_x_dtype(x_dtype)
    if x_dtype == "float32":
        return {"indices": np.dtype(np.int32), "data": np.dtype(np.float32), "indptr": np.dtype(np.int64)}
    data = csr.data
    small = data.size == 0 or data.dtype == np.uint16 or (float(data.max()) <= 65535 and float(data.min()) >= 0
                               and bool(np.all(data == np.floor(data))))
    return {"indices": np.dtype(np.uint16 if csr.shape[1] <= 65536 else np.int32),
            "data": np.dtype(np.uint16 if small else np.float32), "indptr": np.dtype(np.int64)}


def write_shard(path: Path, csr: sp.csr_matrix, obs: pd.DataFrame, var: pd.DataFrame, *,
                codec: str, chunk_nnz: int = CHUNK_NNZ, x_dtype: str = "auto",
                chunks: dict[str, bytes] | None = None) -> dict[str, str]:
    """Write an AnnData Zarr v3 store at ``path`` (a fresh directory): X CSR counts, obs, var.

    Returns the stored dtypes of X's arrays (see ``x_dtypes``). ``chunks``, when given, receives every chunk
    file written under X/ (path relative to X/ -> its bytes), so the shard's checksum needs no re-read."""
    dtypes = x_dtypes(csr, x_dtype)
    # the metadata, obs and var are written by zarr into memory, then to disk in one go: anndata's ~150
    # small writes per shard each wait on zarr's event loop and thread pool (0.15 s a shard on disk, 0.085 s so)
    files: dict[str, Any] = {}
    with anndata.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False):
        root = zarr.open_group(MemoryStore(files), mode="w", zarr_format=3)
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        write_elem(root, "obs", obs)
        write_elem(root, "var", var)
    x = root.create_group("X")
    x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": list(csr.shape)})
    arrays = {"data": csr.data.astype(dtypes["data"], copy=False),
              "indices": csr.indices.astype(dtypes["indices"], copy=False),
              "indptr": csr.indptr.astype(np.int64, copy=False)}
    sizes = {name: max(1, values.size) if name == "indptr" else chunk_nnz for name, values in arrays.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        for name, values in arrays.items():
            # zarr writes the metadata (zarr.json); the chunks are encoded here, see _write_chunks
            x.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(sizes[name],),
                           compressors=[make_codec(codec)])
    for key, buf in files.items():
        target = Path(path) / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(buf.to_bytes())
    for name, values in arrays.items():
        _write_chunks(Path(path) / "X" / name, values, sizes[name], codec, chunks)
    return {k: v.name for k, v in dtypes.items()}


def _write_chunks(array_dir: Path, values: np.ndarray, chunk: int, codec: str,
                  written: dict[str, bytes] | None = None) -> None:
    """Encode and store a 1-D array's chunks as zarr v3 does for our codecs, at half zarr-python's CPU cost.

    A chunk is the little-endian bytes of ``chunk`` values (the last one padded with the
    fill value 0, as zarr pads edge chunks) through the compressor, stored under the
    default key encoding ``c/<i>``. Every chunk is written, all-zero ones included (zarr
    would skip those by default, and verify would report them missing). The round trip
    through zarr and anndata is checked by the tests, for every codec.
    """
    encoder = _numcodec(codec)
    keys = array_dir / "c"
    keys.mkdir(parents=True, exist_ok=True)
    values = values.astype(values.dtype.newbyteorder("<"), copy=False)
    # files are created and written by two threads while this one encodes the next chunks: creating a file
    # costs ~0.2 ms of the filesystem's time, ~9,000 files for 200k cells
    with ThreadPoolExecutor(2) as writers:
        pending = []
        for i, lo in enumerate(range(0, values.size, chunk)):
            piece = values[lo:lo + chunk]
            if piece.size < chunk:
                piece = np.concatenate([piece, np.zeros(chunk - piece.size, dtype=values.dtype)])
            encoded = bytes(encoder.encode(np.ascontiguousarray(piece)))
            pending.append(writers.submit(_write_file, keys / str(i), encoded))
            if written is not None:
                written[f"{array_dir.name}/c/{i}"] = encoded
        for f in pending:
            f.result()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _numcodec(name: str) -> Any:
    """The numcodecs codec that writes the same bytes as ``make_codec(name)`` in zarr v3."""
    kw = _CODEC_ARGS[name]
    if name == "zstd":
        return numcodecs.Zstd(**kw)
    if name.startswith("blosc-"):
        return numcodecs.Blosc(**kw, shuffle=numcodecs.Blosc.SHUFFLE)
    return numcodecs.LZ4()


def expected_chunks(array_dir: Path) -> list[str]:
    """Chunk keys a 1-D array should have, from its zarr.json (shape, chunk shape, key encoding)."""
    meta = json.loads((array_dir / "zarr.json").read_text())
    (size,) = meta["shape"]
    (chunk,) = meta["chunk_grid"]["configuration"]["chunk_shape"]
    encoding = meta.get("chunk_key_encoding", {})
    sep = encoding.get("configuration", {}).get("separator", "/")
    n = math.ceil(size / chunk) if size else 0
    if encoding.get("name", "default") == "v2":
        return [str(i) for i in range(n)]
    return [f"c{sep}{i}" for i in range(n)]


def check_shard(path: Path, *, n_cells: int, n_genes: int, nnz: int) -> list[str]:
    """Problems with a shard's X on disk: missing arrays or chunks, wrong shape or nnz. Empty = fine."""
    problems: list[str] = []
    x = path / "X"
    for name in X_ARRAYS:
        adir = x / name
        if not (adir / "zarr.json").is_file():
            problems.append(f"X/{name} is missing")
            continue
        keys = expected_chunks(adir)
        missing = [k for k in keys if not (adir / k).is_file()]
        if missing:
            problems.append(f"X/{name} is missing {len(missing)} of {len(keys)} chunks "
                            f"({', '.join(missing[:3])})")
    if problems:
        return problems
    try:
        group = zarr.open_group(x, mode="r")
        shape = list(group.attrs.get("shape", []))
        indptr = group["indptr"]
        last = int(indptr[-1]) if indptr.shape[0] else -1
        n_data, n_indices = group["data"].shape[0], group["indices"].shape[0]
    except Exception as exc:  # a truncated chunk surfaces as a codec error of any type
        return [f"X cannot be read ({type(exc).__name__}: {exc})"]
    if shape != [n_cells, n_genes]:
        problems.append(f"X shape is {shape}, manifest says {[n_cells, n_genes]}")
    if indptr.shape[0] != n_cells + 1:
        problems.append(f"X/indptr has {indptr.shape[0]} entries, expected {n_cells + 1}")
    if not (n_data == n_indices == last == nnz):
        problems.append(f"X nnz mismatch: data {n_data}, indices {n_indices}, indptr[-1] {last}, "
                        f"manifest {nnz}")
    return problems
