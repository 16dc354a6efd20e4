"""h5ad sources, read through h5py with anndata's element readers.

Not ``anndata.read_h5ad(backed="r")``: backed mode keeps X on disk but loads every
layer (and all of obs) into memory, while here only the chosen matrix is sliced
block by block and only the obs columns the build needs are read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

from scpretrain.sharding.errors import InputError
from scpretrain.sharding.sources.base import Block, Source, source_genes
from scpretrain.sharding.sources.h5direct import DirectArray, direct, open_fd
from scpretrain.sharding.validate import ValueFaults

_SAMPLE_ROWS = 2000  # rows inspected when auto-detecting which matrix holds counts
_MAX_CSC_NNZ = 50_000_000  # a CSC matrix is converted in memory only up to this size


class H5adSource(Source):
    def __init__(self, path: Path, matrix_option: str | None):
        self.file = _open_h5(path)
        try:
            obs_group = self.file["obs"]
            self._obs_index_key = str(obs_group.attrs.get("_index", "_index"))
            columns = [str(c) for c in obs_group.attrs.get("column-order", [])]
            label, elem, var_group = self._pick_matrix(path, matrix_option)
            self._matrix = _MatrixReader(path, label, elem)
            var = read_elem(var_group)
        except InputError:
            self.file.close()
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            self.file.close()
            raise _unreadable(path, exc) from None
        super().__init__(spec=str(path), kind="h5ad", path=path, n_cells=self._matrix.shape[0],
                         genes=source_genes(var), matrix=label, obs_columns=columns,
                         notes=list(self._matrix.notes))
        if len(self.genes.names) != self._matrix.shape[1]:
            self.file.close()
            raise InputError(f"{path}: {label} has {self._matrix.shape[1]} columns but var has "
                             f"{len(self.genes.names)} genes; re-export the file")
        self.notes.insert(0, self._detect_note)

    def cell_ids(self) -> pd.Index:
        return pd.Index(self._read_obs_elem(self._obs_index_key)).astype(str)

    def blocks(self, rows: int, columns: list[str], start: int = 0, stop: int | None = None) -> Iterator[Block]:
        names = self.cell_ids()
        obs = pd.DataFrame({c: self._read_obs_elem(c) for c in columns if c in self.obs_columns}, index=names)
        end = self.n_cells if stop is None else min(stop, self.n_cells)
        for first in range(start, end, rows):
            last = min(first + rows, end)
            yield Block(first, self._matrix.rows(first, last), obs.iloc[first:last])

    def close(self) -> None:
        self._matrix.close()
        self.file.close()

    def _read_obs_elem(self, key: str) -> Any:
        try:
            elem = self.file["obs"][key]
            ref = elem.attrs.get("categories") if isinstance(elem, h5py.Dataset) else None
            if ref is not None:  # anndata < 0.8 files: int codes, categories behind an object reference
                cats = self.file[ref][...]
                cats = [c.decode() if isinstance(c, bytes) else c for c in cats.tolist()]
                return pd.Categorical.from_codes(elem[...].astype(np.int64), categories=cats)
            return read_elem(elem)
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise InputError(f"{self.path}: cannot read obs['{key}'] ({exc}); the file is truncated or "
                             "corrupt (re-export or re-download it)") from None

    def _candidates(self) -> dict[str, tuple[str, Any, Any]]:
        f, out = self.file, {}
        if "X" in f:
            out["X"] = ("X", f["X"], f["var"])
        if "raw" in f and "X" in f["raw"]:
            out["raw"] = ("raw.X", f["raw"]["X"], f["raw"]["var"])  # raw may hold more genes than X
        for name in f.get("layers", {}):
            out[f"layer:{name}"] = (f"layers['{name}']", f["layers"][name], f["var"])
        return out

    def _pick_matrix(self, path: Path, option: str | None) -> tuple[str, Any, Any]:
        cands = self._candidates()
        if not cands:
            raise InputError(f"{path}: no count matrix (X, raw.X or layers); "
                             "re-export the file with counts in X")
        if option is not None:
            if option not in cands:
                raise InputError(f"{path}: --matrix {option} is not in the file; options: {', '.join(cands)}")
            self._detect_note = f"{path}: counts from {cands[option][0]} (--matrix {option})"
            return cands[option]
        faults = {}
        for key, (label, elem, _) in cands.items():
            faults[key] = _sample_faults(path, label, elem)
            if faults[key].is_clean():
                self._detect_note = f"{path}: counts from {label} (auto-detected: non-negative integers)"
                return cands[key]
        if len(cands) == 1:
            # one matrix only: use it and let the full validation name the exact fault and its count
            (only,) = cands.values()
            self._detect_note = f"{path}: counts from {only[0]} (the only matrix)"
            return only
        found = "; ".join(f"{cands[k][0]}: {faults[k].summary()} in the first rows" for k in cands)
        raise InputError(f"{path}: no matrix holds non-negative integer counts ({found}); "
                         f"pass --matrix with one of {', '.join(cands)}")


class _MatrixReader:
    """Row-block access to X, raw.X or a layer, whatever its on-disk encoding."""

    def __init__(self, path: Path, label: str, elem: Any):
        self.path, self.label, self.notes = path, label, []
        self._fd: int | None = None
        self._direct: tuple[DirectArray, DirectArray, DirectArray] | None = None
        if isinstance(elem, h5py.Dataset):
            # dense on disk: accepted on purpose, each block is converted to CSR
            self._dense, self.shape = elem, tuple(elem.shape)
            self.notes.append(f"{path}: {label} is dense; converting each block to CSR")
            return
        self._dense = None
        encoding = elem.attrs.get("encoding-type", "")
        if encoding == "csr_matrix":
            self._sparse = sparse_dataset(elem)
            self._open_direct(path, elem)
        elif encoding == "csc_matrix":
            nnz = elem["data"].shape[0]
            if nnz > _MAX_CSC_NNZ:
                raise InputError(f"{path}: {label} is stored as CSC ({nnz} non-zeros); row blocks need CSR "
                                 "(convert with adata.X = adata.X.tocsr() and re-save)")
            self._sparse = sparse_dataset(elem).to_memory().tocsr()
            self.notes.append(f"{path}: {label} is CSC; converted to CSR in memory")
        else:
            raise InputError(f"{path}: {label} has encoding {encoding!r}; expected a CSR, CSC or dense "
                             "matrix (re-export the file with anndata)")
        self.shape = tuple(self._sparse.shape)

    def _open_direct(self, path: Path, elem: Any) -> None:
        """Plain (unfiltered) data/indices/indptr are read straight from the file (``h5direct``)."""
        try:
            self._fd = open_fd(path)
            if self._fd is None:
                return
            arrays = tuple(direct(self._fd, elem[k]) for k in ("data", "indices", "indptr"))
        except (OSError, KeyError, ValueError, TypeError, RuntimeError):
            arrays = (None,)
        if all(a is not None for a in arrays):
            self._direct = arrays  # type: ignore[assignment]
        else:
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._direct = None, None

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        try:
            if self._dense is not None:
                return sp.csr_matrix(self._dense[start:stop])
            if self._direct is not None:
                data, indices, indptr = self._direct
                ptr = indptr.read(start, stop + 1).astype(np.int64)
                a, b = int(ptr[0]), int(ptr[-1])
                return sp.csr_matrix((data.read(a, b), indices.read(a, b), ptr - a),
                                     shape=(stop - start, self.shape[1]))
            return sp.csr_matrix(self._sparse[start:stop])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise InputError(f"{self.path}: cannot read {self.label} rows {start}-{stop} ({exc}); the file "
                             "is truncated or corrupt (re-export or re-download it)") from None


def _open_h5(path: Path) -> h5py.File:
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise _unreadable(path, exc) from None
    missing = [k for k in ("obs", "var") if k not in f]
    if missing:
        f.close()
        raise InputError(f"{path}: not an AnnData h5ad (missing {', '.join(missing)}); "
                         "re-export it with anndata's write_h5ad")
    return f


def _unreadable(path: Path, exc: Exception) -> InputError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return InputError(f"{path}: cannot read h5ad ({reason}); the file is truncated or not an h5ad "
                      "(re-export or re-download it)")


def _sample_faults(path: Path, label: str, elem: Any) -> ValueFaults:
    reader = _MatrixReader(path, label, elem)
    try:
        block = reader.rows(0, min(_SAMPLE_ROWS, reader.shape[0]))
    finally:
        reader.close()
    faults = ValueFaults()
    faults.add(block.data)
    return faults
