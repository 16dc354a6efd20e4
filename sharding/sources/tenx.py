"""10x Genomics outputs: a Matrix Market directory, or a CellRanger ``.h5`` (v3 or v2 layout).

Both store features x barcodes (genes x cells), column-compressed by cell, so one
cell's counts are contiguous and a block of cells is a CSR slab of cells x genes.

``matrix.mtx(.gz)`` is text: it is parsed in chunks and a block of cells is handed
on as soon as the entries have moved past it. That needs the entries grouped by
barcode (column), which is how CellRanger and ``scipy.io.mmwrite`` of a CSC matrix
write them. A file in another order (say gene-major) is read whole, up to
``MAX_UNSORTED_NNZ`` entries, and refused above that with the fix. Only features of
type "Gene Expression" are kept when the file also holds antibody or CRISPR features.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scpretrain.sharding.errors import InputError
from scpretrain.sharding.sources.base import Block, Source, first_line
from scpretrain.sharding.vocab import SourceGenes

MAX_UNSORTED_NNZ = 50_000_000  # a matrix.mtx not grouped by barcode is read whole only up to this size
MTX_CHUNK = 2_000_000  # entries parsed at a time
GEX = "Gene Expression"
# folder names CellRanger uses for its outputs; the dataset is named after the first other folder above them
_GENERIC = {"outs", "filtered_feature_bc_matrix", "raw_feature_bc_matrix", "filtered_gene_bc_matrices",
            "raw_gene_bc_matrices", "sample_filtered_feature_bc_matrix", "sample_raw_feature_bc_matrix",
            "count", "per_sample_outs"}
_V2_DIRS = {"filtered_gene_bc_matrices", "raw_gene_bc_matrices"}  # these hold one folder per genome
_READ_ERRORS = (ValueError, OSError, EOFError, zlib.error, pd.errors.ParserError, KeyError, TypeError)


def find_mtx(directory: Path) -> Path | None:
    for name in ("matrix.mtx.gz", "matrix.mtx"):
        if (directory / name).is_file():
            return directory / name
    return None


class _Features:
    """The kept (Gene Expression) features: ids, symbols, and the source-row -> kept-column map."""

    def __init__(self, where: str, ids: list[str], names: list[str] | None, types: list[str] | None):
        n = len(ids)
        self.n_source = n
        self.notes: list[str] = []
        keep = np.ones(n, dtype=bool)
        if types is not None:
            types_arr = np.asarray(types, dtype=object)
            keep = types_arr == GEX
            if not keep.any():
                found = ", ".join(sorted(set(types)))
                raise InputError(f"{where}: no '{GEX}' features (feature types: {found}); "
                                 "pass a gene expression matrix")
            if not keep.all():
                skipped = pd.Series(types_arr[~keep]).value_counts()
                self.notes.append(f"{where}: kept {int(keep.sum())} '{GEX}' features, skipped "
                                  + ", ".join(f"{v} '{k}'" for k, v in skipped.items()))
        self.col_map = np.full(n, -1, dtype=np.int64)
        self.col_map[keep] = np.arange(int(keep.sum()))
        kept_ids = [i for i, k in zip(ids, keep) if k]
        columns = {} if names is None else {"gene_symbols": [s for s, k in zip(names, keep) if k]}
        self.genes = SourceGenes(kept_ids, columns)


def dataset_name(path: Path) -> str:
    """``.../sample1/outs/filtered_feature_bc_matrix`` -> ``sample1``; ``sample1.h5`` -> ``sample1``."""
    parts = list(reversed(path.resolve().parts))
    if path.is_file() or path.suffix == ".h5":
        stem = path.name[:-3] if path.name.endswith(".h5") else path.stem
        for suffix in ("_filtered_feature_bc_matrix", "_raw_feature_bc_matrix"):
            stem = stem.removesuffix(suffix)
        if stem not in _GENERIC:
            return stem
        parts = parts[1:]
    i = 1 if len(parts) > 1 and parts[1] in _V2_DIRS else 0  # skip the genome folder of a v2 output
    while i < len(parts) - 1 and parts[i] in _GENERIC:
        i += 1
    return parts[i]


class TenxMtxSource(Source):
    """A ``matrix.mtx(.gz)`` + ``features.tsv(.gz)``/``genes.tsv`` + ``barcodes.tsv(.gz)`` directory."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.mtx = find_mtx(directory)
        feat_path = _first_file(directory, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
        bc_path = _first_file(directory, ("barcodes.tsv.gz", "barcodes.tsv"))
        wanted = (("matrix.mtx(.gz)", self.mtx), ("features.tsv(.gz) or genes.tsv", feat_path),
                  ("barcodes.tsv(.gz)", bc_path))
        missing = [name for name, found in wanted if found is None]
        if missing:
            raise InputError(f"{directory}: 10x directory lacks {', '.join(missing)}; pass the folder that "
                             "holds matrix.mtx, features.tsv and barcodes.tsv "
                             "(e.g. outs/filtered_feature_bc_matrix)")
        assert self.mtx is not None and feat_path is not None and bc_path is not None
        self._files = [self.mtx, feat_path, bc_path]
        table = _read_tsv(feat_path)
        self.features = _Features(str(feat_path), table[0].tolist(),
                                  table[1].tolist() if table.shape[1] > 1 else None,
                                  table[2].tolist() if table.shape[1] > 2 else None)
        self.barcodes = pd.Index(_read_tsv(bc_path)[0])
        self._header_lines, n_rows, n_cols, self.nnz = _mtx_header(self.mtx)
        if (n_rows, n_cols) != (self.features.n_source, len(self.barcodes)):
            raise InputError(f"{self.mtx}: size line says {n_rows} features x {n_cols} barcodes but "
                             f"{feat_path.name} has {self.features.n_source} and {bc_path.name} has "
                             f"{len(self.barcodes)}; the files come from different runs "
                             "(re-export them together)")
        super().__init__(spec=str(directory), kind="10x-mtx", path=directory, n_cells=n_cols,
                         genes=self.features.genes, matrix=self.mtx.name, obs_columns=[],
                         notes=list(self.features.notes))

    @property
    def dataset_default(self) -> str:
        return dataset_name(self.dir)

    def files(self) -> list[Path]:
        return list(self._files)

    def cell_ids(self) -> pd.Index:
        return self.barcodes

    def blocks(self, rows: int, columns: list[str], start: int = 0, stop: int | None = None) -> Iterator[Block]:
        """Cells in order; streamed when the entries are grouped by barcode, else read whole. A text file
        cannot seek: a range is read from the top and its blocks kept."""
        end = self.n_cells if stop is None else stop
        for block in self._all_blocks(rows):
            if block.start >= end:
                return
            if block.start >= start:
                yield block

    def _all_blocks(self, rows: int) -> Iterator[Block]:
        buf = (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.float64),)
        next_start, seen, last = 0, 0, -1
        chunks = self._chunks()
        for cells, genes, values in chunks:
            seen += cells.size
            unsorted = cells.size and (cells[0] < last or np.any(np.diff(cells) < 0))
            if unsorted:
                if next_start > 0:
                    raise InputError(
                        f"{self.mtx}: entries are not grouped by barcode (column) past entry "
                        f"{seen - cells.size}; streaming needs them grouped as CellRanger writes them "
                        "(rewrite the file column-major, e.g. scipy.io.mmwrite of a CSC matrix, or convert "
                        "it to h5ad)")
                yield from self._whole(rows, [buf, (cells, genes, values)], chunks)
                return
            if cells.size:
                last = int(cells[-1])
            buf = tuple(np.concatenate([a, b]) for a, b in zip(buf, (cells, genes, values)))
            while next_start + rows <= last:  # every cell before `last` is complete
                block, buf = self._cut(next_start, next_start + rows, buf)
                yield block
                next_start += rows
        self._check_count(seen)
        while next_start < self.n_cells:
            stop = min(next_start + rows, self.n_cells)
            block, buf = self._cut(next_start, stop, buf)
            yield block
            next_start = stop

    def _whole(self, rows: int, parts: list[tuple[np.ndarray, ...]],
               rest: Iterator[tuple[np.ndarray, ...]]) -> Iterator[Block]:
        """Read the remaining chunks of ``rest`` too, then hand out blocks of the whole matrix."""
        if self.nnz > MAX_UNSORTED_NNZ:
            raise InputError(
                f"{self.mtx}: entries are not grouped by barcode (column) and the matrix has {self.nnz} "
                f"entries, more than the {MAX_UNSORTED_NNZ} read in memory; rewrite it column-major "
                "(e.g. scipy.io.mmwrite of a CSC matrix) or convert it to h5ad")
        for chunk in rest:
            parts.append(chunk)
        seen = sum(p[0].size for p in parts)
        self._check_count(seen)
        cells, genes, values = (np.concatenate([p[i] for p in parts]) for i in range(3))
        csr = self._csr(cells, genes, values, self.n_cells)
        for start in range(0, self.n_cells, rows):
            stop = min(start + rows, self.n_cells)
            yield Block(start, csr[start:stop], pd.DataFrame(index=self.barcodes[start:stop]))

    def _cut(self, start: int, stop: int,
             buf: tuple[np.ndarray, ...]) -> tuple[Block, tuple[np.ndarray, ...]]:
        k = int(np.searchsorted(buf[0], stop, side="left"))
        csr = self._csr(buf[0][:k] - start, buf[1][:k], buf[2][:k], stop - start)
        return Block(start, csr, pd.DataFrame(index=self.barcodes[start:stop])), tuple(a[k:] for a in buf)

    def _csr(self, rows: np.ndarray, features: np.ndarray, values: np.ndarray, n: int) -> sp.csr_matrix:
        cols = self.features.col_map[features]
        keep = cols >= 0
        if not keep.all():
            rows, cols, values = rows[keep], cols[keep], values[keep]
        # duplicate entries are summed, as scipy.io.mmread does
        return sp.coo_matrix((values, (rows, cols)), shape=(n, len(self.features.genes.names))).tocsr()

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(cell, feature, value) arrays, 0-based, range-checked, MTX_CHUNK entries at a time."""
        n_features = self.features.n_source
        try:
            reader = pd.read_csv(self.mtx, sep=r"\s+", header=None, skiprows=self._header_lines,
                                 names=["row", "col", "value"], usecols=[0, 1, 2], comment="%",
                                 dtype={"row": np.int64, "col": np.int64, "value": np.float64},
                                 chunksize=MTX_CHUNK, engine="c")
            with reader:
                for chunk in reader:
                    genes = chunk["row"].to_numpy() - 1
                    cells = chunk["col"].to_numpy() - 1
                    bad = (genes < 0) | (genes >= n_features) | (cells < 0) | (cells >= self.n_cells)
                    if bad.any():
                        raise InputError(f"{self.mtx}: {int(bad.sum())} entries lie outside the "
                                         f"{n_features} x {self.n_cells} matrix; the file is corrupt "
                                         "(re-export it)")
                    yield cells, genes, chunk["value"].to_numpy()
        except InputError:
            raise
        except pd.errors.EmptyDataError:
            return
        except _READ_ERRORS as exc:
            raise InputError(f"{self.mtx}: cannot read the entries ({first_line(exc)}); the file is "
                             "truncated or corrupt (re-download or re-export it)") from None

    def _check_count(self, seen: int) -> None:
        if seen != self.nnz:
            raise InputError(f"{self.mtx}: {seen} entries but the size line promises {self.nnz}; the file is "
                             "truncated (re-download or re-export it)")


class TenxH5Source(Source):
    """A CellRanger ``.h5``: v3 ``matrix/{data,indices,indptr,shape,barcodes,features/...}``, or v2 (one
    group per genome)."""

    def __init__(self, path: Path):
        try:
            self.file = h5py.File(path, "r")
        except OSError as exc:
            raise _unreadable_h5(path, exc) from None
        try:
            self._group, features = self._layout(path)
            g = self._group
            n_features, n_cells = (int(v) for v in g["shape"][:])
            self._indptr = g["indptr"][:].astype(np.int64)
            self._data, self._indices = g["data"], g["indices"]
            self.barcodes = pd.Index(_strings(g["barcodes"][:]))
        except InputError:
            self.file.close()
            raise
        except _READ_ERRORS + (RuntimeError,) as exc:
            self.file.close()
            raise _unreadable_h5(path, exc) from None
        self.features = features
        gname = g.name.strip("/")
        problem = None
        if features.n_source != n_features or len(self.barcodes) != n_cells:
            problem = (f"shape is {n_features} features x {n_cells} barcodes but it lists "
                       f"{features.n_source} features and {len(self.barcodes)} barcodes")
        elif self._indptr.size != n_cells + 1 or self._indptr[-1] != self._data.shape[0]:
            problem = f"indptr has {self._indptr.size} entries ending at {self._indptr[-1]}, data has " \
                      f"{self._data.shape[0]}"
        if problem:
            self.file.close()
            raise InputError(f"{path}: {gname}: {problem}; the file is corrupt (re-run cellranger "
                             "or re-download it)")
        super().__init__(spec=str(path), kind="10x-h5", path=path, n_cells=n_cells, genes=features.genes,
                         matrix=f"{gname}/data", obs_columns=[], notes=list(features.notes))

    @property
    def dataset_default(self) -> str:
        return dataset_name(Path(self.spec))

    def cell_ids(self) -> pd.Index:
        return self.barcodes

    def blocks(self, rows: int, columns: list[str], begin: int = 0, end: int | None = None) -> Iterator[Block]:
        n_source = self.features.n_source
        end = self.n_cells if end is None else min(end, self.n_cells)
        for start in range(begin, end, rows):
            stop = min(start + rows, end)
            a, b = int(self._indptr[start]), int(self._indptr[stop])
            try:
                data, indices = self._data[a:b], self._indices[a:b].astype(np.int64)
            except _READ_ERRORS + (RuntimeError,) as exc:
                raise InputError(f"{self.path}: cannot read cells {start}-{stop} ({first_line(exc)}); "
                                 "the file is truncated or corrupt (re-download it)") from None
            if indices.size and (indices.min() < 0 or indices.max() >= n_source):
                raise InputError(f"{self.path}: feature indices outside 0-{n_source - 1} in cells "
                                 f"{start}-{stop}; the file is corrupt (re-download it)")
            indptr = self._indptr[start:stop + 1] - a
            csr = sp.csr_matrix((data, indices, indptr), shape=(stop - start, n_source))
            cols = self.features.col_map
            if (cols < 0).any():
                csr = csr[:, np.flatnonzero(cols >= 0)]
            csr.sum_duplicates()
            yield Block(start, csr, pd.DataFrame(index=self.barcodes[start:stop]))

    def close(self) -> None:
        self.file.close()

    def _layout(self, path: Path) -> tuple[Any, _Features]:
        f = self.file
        if "matrix" in f:
            g = f["matrix"]
            feats = g["features"]
            types = _strings(feats["feature_type"][:]) if "feature_type" in feats else None
            names = _strings(feats["name"][:]) if "name" in feats else None
            return g, _Features(f"{path}: matrix/features", _strings(feats["id"][:]), names, types)
        genomes = [k for k in f if isinstance(f[k], h5py.Group) and "barcodes" in f[k]]
        if len(genomes) != 1:
            what = (f"several genomes ({', '.join(genomes)})" if genomes
                    else f"no 'matrix' group (has {', '.join(f)})")
            raise InputError(f"{path}: not a single-genome CellRanger h5 ({what}); pass a CellRanger v2/v3 "
                             "filtered_feature_bc_matrix.h5")
        g = f[genomes[0]]
        names = _strings(g["gene_names"][:]) if "gene_names" in g else None
        return g, _Features(f"{path}: {genomes[0]}/genes", _strings(g["genes"][:]), names, None)


def _first_file(directory: Path, names: tuple[str, ...]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False, quoting=3)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: is empty; re-export the 10x output") from None
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: cannot read ({first_line(exc)}); the file is truncated or corrupt "
                         "(re-download or re-export it)") from None
    return table


def _mtx_header(path: Path) -> tuple[int, int, int, int]:
    """(header lines, rows, cols, entries) of a Matrix Market file; refuses all but sparse count matrices."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="ascii", errors="replace") as f:
            banner = f.readline()
            tokens = banner.lower().split()
            if len(tokens) != 5 or tokens[0] != "%%matrixmarket" or tokens[1] != "matrix":
                raise InputError(f"{path}: not a Matrix Market file (first line {banner.strip()[:60]!r}); "
                                 "pass a 10x matrix.mtx(.gz)")
            fmt, field, symmetry = tokens[2:]
            if fmt != "coordinate" or field not in ("integer", "real", "double") or symmetry != "general":
                raise InputError(f"{path}: a '{fmt} {field} {symmetry}' matrix; expected "
                                 "'coordinate integer general' (10x counts)")
            n_lines = 1
            for line in f:
                n_lines += 1
                if line.strip() and not line.startswith("%"):
                    sizes = line.split()
                    if len(sizes) != 3:
                        break
                    rows, cols, nnz = (int(v) for v in sizes)
                    return n_lines, rows, cols, nnz
    except InputError:
        raise
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: cannot read the header ({first_line(exc)}); the file is truncated or "
                         "corrupt (re-download or re-export it)") from None
    raise InputError(f"{path}: no 'rows cols entries' size line after the header; the file is truncated "
                     "(re-download or re-export it)")


def _strings(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _unreadable_h5(path: Path, exc: BaseException) -> InputError:
    return InputError(f"{path}: cannot read 10x h5 ({first_line(exc)}); the file is truncated or not a "
                      "CellRanger h5 (re-download it)")
