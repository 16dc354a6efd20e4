"""Named vector tables for ``evaluate`` (GenePT-w gene embeddings, LangCell label embeddings): the core reader
(``scmodels.vectors``) with its refusals as ``EvaluateError``s."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from scpretrain.evaluate.errors import EvaluateError
from scpretrain.scmodels import vectors as _core
from scpretrain.scmodels.vectors import NAME_FILES  # noqa: F401 - re-exported


def read_vectors(path: str | Path, names_file: str | Path | None = None) -> tuple[list[str], np.ndarray]:
    """(names, float32 matrix [n, width]) from a text table, a .npy + names file or a JSON object."""
    try:
        return _core.read_vectors(path, names_file)
    except _core.VectorsError as e:
        raise EvaluateError(str(e)) from None


def write_vectors(path: str | Path, names: list[str], vectors: np.ndarray) -> Path:
    """``NAME<TAB>v1<TAB>v2 ...`` lines that :func:`read_vectors` reads back exactly."""
    try:
        return _core.write_vectors(path, names, vectors)
    except _core.VectorsError as e:
        raise EvaluateError(str(e)) from None
