"""Tables of named vectors, one reader for every stage: gene embeddings for pretraining (gene2vec, GenePT),
per-gene embeddings downstream (GenePT-w) and per-label text embeddings (LangCell).

Formats (never pickle: a downloaded file must not run code):

* text (``.txt``, ``.tsv``, ``.vec``, anything not listed below) — one row per line,
  ``NAME<TAB>v1<TAB>v2 ...`` (values may also be space separated after the tab, so names
  may hold spaces: "CD4+ T cell") or, without a tab, ``NAME v1 v2 ...`` (word2vec text).
  A word2vec header ``"<n> <dim>"``, a first line whose values are not numbers (a column
  header) and lines starting with ``#`` are skipped.
* ``.npy`` — a matrix [n, width] plus its row names, one a line, in ``names_file`` or,
  by default, the first of ``<stem>.genes.txt``, ``<stem>.labels.txt``, ``<stem>.names.txt``
  that exists beside it.
* ``.json`` — an object ``{"NAME": [v1, v2, ...], ...}`` (e.g. GenePT's gene dictionary,
  converted from its pickle once by whoever trusts it).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class VectorsError(ValueError):
    """A vector table that cannot be read; the message names the file, the line and the fix."""

NAME_FILES = (".genes.txt", ".labels.txt", ".names.txt")


def _names_for(path: Path, names_file: str | Path | None) -> Path:
    if names_file is not None:
        p = Path(names_file)
        if not p.is_file():
            raise VectorsError(f"{p}: names file not found; pass the file listing the rows of {path}")
        return p
    for suffix in NAME_FILES:
        cand = path.with_suffix(suffix)
        if cand.is_file():
            return cand
    raise VectorsError(f"{path}: a .npy table needs its row names; write {path.with_suffix('.genes.txt')} "
                        "(or .labels.txt), one name per line in row order, or pass the names file")


def _parse_line(line: str) -> tuple[str, list[str]]:
    if "\t" in line:
        name, _, rest = line.partition("\t")
        return name.strip(), rest.replace("\t", " ").split()
    parts = line.split()
    return parts[0], parts[1:]


def _read_text(path: Path) -> tuple[list[str], np.ndarray]:
    names: list[str] = []
    rows: list[list[float]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip() or line.startswith("#"):
                continue
            name, values = _parse_line(line.rstrip("\n"))
            if not rows and not names and len(values) == 1 and name.isdigit() and values[0].isdigit():
                continue  # word2vec header "<n> <dim>"
            try:
                vec = [float(v) for v in values]
            except ValueError:
                if not rows:
                    continue  # a column header
                raise VectorsError(f"{path}: line {lineno} is not 'NAME<TAB>v1<TAB>v2 ...'") from None
            if not vec or (rows and len(vec) != len(rows[0])):
                raise VectorsError(f"{path}: line {lineno} has {len(vec)} values, the first row has "
                                    f"{len(rows[0]) if rows else 0}; every row needs the same width")
            names.append(name)
            rows.append(vec)
    if not rows:
        raise VectorsError(f"{path}: no vectors found; expected lines 'NAME<TAB>v1<TAB>v2 ...'")
    return names, np.asarray(rows, dtype=np.float32)


def _read_json(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VectorsError(f"{path}: not valid JSON ({e}); expected {{\"NAME\": [v1, v2, ...]}}") from e
    if not isinstance(table, dict) or not table:
        raise VectorsError(f"{path}: expected a non-empty JSON object {{\"NAME\": [v1, v2, ...]}}")
    names = [str(k) for k in table]
    try:
        mat = np.asarray([np.asarray(v, dtype=np.float32) for v in table.values()])
    except (TypeError, ValueError) as e:
        raise VectorsError(f"{path}: every value must be a list of numbers of the same length ({e})") from e
    if mat.ndim != 2:
        raise VectorsError(f"{path}: the vectors differ in length; every value needs the same width")
    return names, mat


def read_vectors(path: str | Path, names_file: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """(names, float32 matrix [n, width]) from a text table, a .npy + names file or a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise VectorsError(f"{path}: no such file; pass a vector table (NAME<TAB>v1<TAB>v2 ... lines, "
                            ".npy + names file, or JSON)")
    if path.suffix == ".npy":
        mat = np.load(path, allow_pickle=False)
        npath = _names_for(path, names_file)
        names = [ln.strip() for ln in npath.read_text().splitlines() if ln.strip()]
        if mat.ndim != 2 or mat.shape[0] != len(names):
            raise VectorsError(f"{path}: matrix shape {mat.shape} does not match the {len(names)} names in "
                                f"{npath}; the names file needs one line per matrix row")
        names_mat = names, mat.astype(np.float32)
    elif path.suffix == ".json":
        names_mat = _read_json(path)
    else:
        names_mat = _read_text(path)
    names, mat = names_mat
    if not np.isfinite(mat).all():
        raise VectorsError(f"{path}: {int((~np.isfinite(mat)).sum())} values are NaN or infinite; "
                            "fix or drop those rows")
    return names, mat


def write_vectors(path: str | Path, names: list[str], vectors: np.ndarray) -> Path:
    """Write ``NAME<TAB>v1<TAB>v2 ...`` lines (the text format :func:`read_vectors` reads);
    float32 round-trips exactly (9 significant digits)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for n, v in zip(names, np.asarray(vectors, dtype=np.float32)):
            if "\t" in n or "\n" in n:
                raise VectorsError(f"{path}: name {n!r} holds a tab or newline; the table cannot store it")
            fh.write(n + "\t" + "\t".join(f"{x:.9g}" for x in v) + "\n")
    return path
