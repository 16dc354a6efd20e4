"""Direct chunk reads of 1-D Zarr v3 arrays: file bytes -> numcodecs decode -> numpy.

zarr-python's own read path costs milliseconds of Python per call, which dominates block reads
of a few hundred cells. For the layouts our builder writes (regular 1-D chunks, ``bytes`` codec
then one compressor) we read the chunk files ourselves and decode them with numcodecs (blosc
releases the GIL, so a thread pool decodes chunks in parallel). Any other layout falls back to
zarr-python, so the reader stays correct on every valid store.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

_DTYPES = {"float32": "<f4", "float64": "<f8", "int8": "i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
           "uint8": "u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8"}


def _compressor(codec: dict):
    import numcodecs

    name, conf = codec["name"], codec.get("configuration", {})
    if name == "zstd":
        return numcodecs.Zstd(level=conf.get("level", 0))
    if name == "gzip":
        return numcodecs.GZip(level=conf.get("level", 1))
    if name == "blosc":
        return numcodecs.Blosc(cname=conf.get("cname", "lz4"))  # decoding reads the header, not these
    if name.startswith("numcodecs."):
        return numcodecs.get_codec({"id": name.split(".", 1)[1], **conf})
    return None


class MissingChunk(OSError):
    """A chunk file of a corpus shard is absent: the shard is damaged (our builder writes every chunk)."""


def missing_chunk(path: Path, i: int) -> MissingChunk:
    shard = path.parent.parent
    return MissingChunk(f"{path / 'c' / str(i)}: chunk {i} of X/{path.name} of shard {shard.name} is missing, so the "
                        f"shard is damaged (streaming it would give wrong counts); run `python -m sharding verify "
                        f"{shard.parent.parent}` and rebuild the corpus")


class ChunkedArray:
    """Read-only 1-D Zarr v3 array with a fast path; ``[a:b]`` slicing only."""

    def __init__(self, path: Path, pool: ThreadPoolExecutor | None = None):
        self.path = Path(path)
        meta = json.loads((self.path / "zarr.json").read_text())
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(_DTYPES.get(meta["data_type"], "V"))
        self.fill = meta.get("fill_value", 0)
        self.pool = pool
        self._fallback = None
        codecs = meta.get("codecs", [])
        grid = meta.get("chunk_grid", {})
        sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
        enc = meta.get("chunk_key_encoding", {}).get("name", "default")
        ok = (len(self.shape) == 1 and grid.get("name") == "regular" and enc == "default" and self.dtype.kind != "V"
              and codecs and codecs[0]["name"] == "bytes"
              and codecs[0].get("configuration", {}).get("endian", "little") == "little"
              and len(codecs) <= 2 and not meta.get("storage_transformers"))
        self.comp = _compressor(codecs[1]) if ok and len(codecs) == 2 else None
        if not ok or (len(codecs) == 2 and self.comp is None):
            import zarr

            self._fallback = zarr.open_array(str(self.path), mode="r")
            return
        self.chunk = int(grid["configuration"]["chunk_shape"][0])
        self.sep = sep

    def _chunk(self, i: int) -> np.ndarray:
        n = min(self.chunk, self.shape[0] - i * self.chunk)
        f = self.path / f"c{self.sep}{i}"
        try:
            raw = f.read_bytes()
        except FileNotFoundError:
            # zarr would read an absent chunk as the fill value; our builder writes every chunk, so an
            # absent one is damage, and zeros (or gene 0 for every value) would train silently
            raise missing_chunk(self.path, i) from None
        buf = self.comp.decode(raw) if self.comp is not None else raw
        return np.frombuffer(buf, dtype=self.dtype, count=n)

    @property
    def direct(self) -> bool:
        """True when chunks can be decoded straight into a caller's buffer (``decode_into``)."""
        return self._fallback is None

    def decode_into(self, i: int, out: np.ndarray) -> None:
        """Decode chunk ``i`` into ``out`` (``self.chunk`` values of any dtype; cast when it differs).

        Every stored chunk holds a full chunk of values (zarr pads edge chunks), so a decode of the
        store's own dtype lands in ``out`` with no copy; an absent chunk is an error (``MissingChunk``).
        """
        f = self.path / f"c{self.sep}{i}"
        try:
            raw = f.read_bytes()
        except FileNotFoundError:
            raise missing_chunk(self.path, i) from None
        if out.dtype == self.dtype and self.comp is not None:
            self.comp.decode(raw, out=out)
        elif self.comp is not None:
            out[:] = np.frombuffer(self.comp.decode(raw), dtype=self.dtype, count=self.chunk)
        else:
            out[:] = np.frombuffer(raw, dtype=self.dtype, count=self.chunk)

    def chunks(self, ids: list[int]) -> dict[int, np.ndarray]:
        if self.pool is not None and len(ids) > 1:
            return dict(zip(ids, self.pool.map(self._chunk, ids)))
        return {i: self._chunk(i) for i in ids}

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        """Several [a, b) slices at once; every chunk decoded once, in parallel."""
        if self._fallback is not None:
            return [np.asarray(self._fallback[a:b]) for a, b in ranges]
        need = sorted({c for a, b in ranges if b > a for c in range(a // self.chunk, (b - 1) // self.chunk + 1)})
        got = self.chunks(need)
        out = []
        for a, b in ranges:
            if b <= a:
                out.append(np.zeros(0, dtype=self.dtype))
                continue
            c0, c1 = a // self.chunk, (b - 1) // self.chunk
            if c0 == c1:
                out.append(got[c0][a - c0 * self.chunk: b - c0 * self.chunk])
            else:
                parts = [got[c] for c in range(c0, c1 + 1)]
                out.append(np.concatenate(parts)[a - c0 * self.chunk: b - c0 * self.chunk])
        return out

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b, _ = sl.indices(self.shape[0])
        return self.read_ranges([(a, b)])[0]


def check_chunk_files(array_dir: Path) -> None:
    """Raise ``MissingChunk`` for the first chunk file of this 1-D array that is absent (one directory listing)."""
    meta = json.loads((array_dir / "zarr.json").read_text())
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    if not grid or meta.get("chunk_key_encoding", {}).get("name", "default") != "default":
        return
    n = -(-int(meta["shape"][0]) // int(grid[0]))
    present = {p.name for p in (array_dir / "c").iterdir()} if (array_dir / "c").is_dir() else set()
    for i in range(n):
        if str(i) not in present:
            raise missing_chunk(array_dir, i)
