"""What every source gives the build: metadata up front, then row blocks of counts with their obs."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import scipy.sparse as sp

from scpretrain.sharding import manifest as mf
from scpretrain.sharding.vocab import ID_COLUMNS, SYMBOL_COLUMNS, SourceGenes

_SHA: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: a file is hashed once per process
_SHA_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """A source file's sha256, remembered for as long as its size and mtime stay the same."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA:
            return _SHA[key]
    digest = mf.file_sha256(path)
    with _SHA_LOCK:
        _SHA[key] = digest
    return digest


def hash_ahead(paths: Iterable[str]) -> threading.Thread:
    """Hash the source files in a background thread (hashlib releases the GIL): the one-process build starts
    it beside phase 2, which leaves a core mostly idle, so the manifest's sha256 costs no wall time there."""
    def work() -> None:
        for p in paths:
            try:
                file_sha256(p)
            except OSError:  # gone or unreadable: the manifest step hashes it again and reports it
                pass

    t = threading.Thread(target=work, name="hash-sources", daemon=True)
    t.start()
    return t


@dataclass
class Block:
    """Rows [start, start + n) of one source: counts (source dtype, source genes) and obs."""

    start: int
    counts: sp.csr_matrix
    obs: pd.DataFrame


@dataclass
class Source:
    """What the build needs from any source; subclasses fill it and implement ``blocks``."""

    spec: str
    kind: str
    path: Path | None
    n_cells: int
    genes: SourceGenes
    matrix: str  # e.g. "X", "raw.X", "layers['counts']" (for messages and the manifest)
    obs_columns: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def dataset_default(self) -> str:
        """dataset_id for cells whose source has no dataset column: the file name, else the spec."""
        return self.spec if self.path is None else Path(self.spec).stem

    def cell_ids(self) -> pd.Index | None:
        """Source cell ids for the duplicate check; None when unique by construction."""
        return None

    def blocks(self, rows: int, columns: list[str], start: int = 0, stop: int | None = None) -> Iterator[Block]:
        """Rows [start, stop) in blocks of ``rows`` (``start`` a multiple of ``rows``; the last block of the
        range ends at ``stop``): a build task reads only its own range."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        """The files whose bytes are this source (checksums, resume fingerprint)."""
        return [] if self.path is None else [self.path]

    def fingerprint(self) -> dict[str, Any]:
        """Cheap identity for resuming a build: size and mtime of each file."""
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files()]
        return {"spec": self.spec, "files": stats, **self.provenance()}

    def sha256(self) -> str | None:
        """sha256 of the source's bytes (one file: its sha256; several: of their names and sha256s)."""
        files = self.files()
        if not files:
            return None
        if len(files) == 1:
            return file_sha256(files[0])
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}\0{file_sha256(p)}\n".encode())
        return h.hexdigest()

    def provenance(self) -> dict[str, Any]:
        """Extra facts recorded with the source in the manifest (a filter, a Census version)."""
        return {}

    def close(self) -> None:
        pass


def source_genes(var: pd.DataFrame) -> SourceGenes:
    """var_names plus the string var columns that may hold gene ids or symbols."""
    columns = {}
    for col in ID_COLUMNS + SYMBOL_COLUMNS:
        if col in var.columns and (pd.api.types.is_string_dtype(var[col])
                                   or isinstance(var[col].dtype, pd.CategoricalDtype)):
            columns[col] = var[col].astype(str).tolist()
    return SourceGenes(var.index.astype(str).tolist(), columns)


def first_line(exc: BaseException) -> str:
    """An exception as one short line for an InputError message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
