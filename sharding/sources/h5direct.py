"""Reading an uncompressed 1-D HDF5 dataset's bytes straight from the file, without HDF5.

h5py holds the GIL while HDF5 reads, so the build's read-ahead thread stopped its main thread for the
whole of every read (phase 1 ran as if serial), and a chunked dataset read through HDF5 pays per chunk. A
dataset stored without filters (anndata's default) lies at known file offsets: one for a contiguous
dataset, one per chunk for a chunked one (HDF5's chunk index, walked once at open). ``os.preadv`` into the
result array releases the GIL. Anything else (compressed or shuffled, a non-native byte order, virtual or
external storage, unallocated chunks) gives None from ``direct`` and is read through h5py as before.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np


class DirectArray:
    """Elements [a, b) of one dataset, read with preadv at the file offsets of its chunks."""

    def __init__(self, fd: int, dtype: np.dtype, size: int, chunk: int, offsets: np.ndarray):
        self.fd, self.dtype, self.size, self.chunk, self.offsets = fd, dtype, size, chunk, offsets

    def read(self, a: int, b: int) -> np.ndarray:
        out = np.empty(max(0, b - a), dtype=self.dtype)
        buf = memoryview(out).cast("B")
        item, pos = self.dtype.itemsize, 0
        while a < b:
            ci = a // self.chunk
            start = int(self.offsets[ci]) + (a - ci * self.chunk) * item
            end_el = min(b, (ci + 1) * self.chunk)
            # chunks written one after another sit back to back in the file: one read for the run
            while end_el < b and int(self.offsets[ci + 1]) == int(self.offsets[ci]) + self.chunk * item:
                ci += 1
                end_el = min(b, (ci + 1) * self.chunk)
            nbytes = (end_el - a) * item
            _pread_full(self.fd, buf[pos:pos + nbytes], start)
            pos += nbytes
            a = end_el
        return out


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += got


def direct(fd: int, ds: Any) -> DirectArray | None:
    """A DirectArray for h5py dataset ``ds`` of the file open as ``fd``, or None when its bytes are not plain."""
    if ds.ndim != 1 or ds.is_virtual or ds.external is not None:  # (no preadv: open_fd gave no fd)
        return None
    dtype = ds.dtype
    if dtype.kind not in "iuf" or not dtype.isnative:
        return None
    if ds.id.get_create_plist().get_nfilters() != 0:
        return None
    size = int(ds.shape[0])
    if ds.chunks is None:
        offset = ds.id.get_offset()
        if offset is None:  # never written
            return None if size else DirectArray(fd, dtype, 0, 1, np.zeros(1, np.int64))
        return DirectArray(fd, dtype, size, max(1, size), np.array([offset], dtype=np.int64))
    chunk = int(ds.chunks[0])
    n = math.ceil(size / chunk)
    starts, offsets = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    bad = []

    def visit(info: Any) -> None:
        i = info.chunk_offset[0] // chunk
        if info.size != chunk * dtype.itemsize or not 0 <= i < n:
            bad.append(i)
            return
        starts[i], offsets[i] = i, info.byte_offset

    ds.id.chunk_iter(visit)
    if bad or (starts < 0).any():  # a chunk missing (fill value) or stored oddly: leave it to HDF5
        return None
    return DirectArray(fd, dtype, size, chunk, offsets)


def open_fd(path: Path) -> int | None:
    """The file opened for direct reads, or None where preadv is unavailable."""
    if not hasattr(os, "preadv"):
        return None
    return os.open(path, os.O_RDONLY)
