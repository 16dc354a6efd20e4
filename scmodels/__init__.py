"""Model architectures and preprocessing, pure torch.

Shared by ``train`` (pretraining) and ``evaluate`` (downstream use of exports).
Nothing here imports deepspeed, mlflow, torch.distributed, tiledbsoma or zarr:
an export must be usable with torch + performer-pytorch + safetensors only.

The names below are loaded on first use, so the torch-free submodules (``atomic``,
``genes``) can be imported without torch: a corpus build (``sharding``) uses them and
would otherwise pay ~1 s of torch import in every process it starts.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_LAZY = {"FAMILIES": "build", "build_model": "build", "embedding_key": "build", "normalize_gene_id": "genes",
         "PreprocessSpec": "preprocess", "csr_to_dense": "preprocess", "preprocess": "preprocess"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``scmodels.preprocess`` is the function, as it always was, although a submodule has the same name:
    importing the submodule (anyone's ``from scpretrain.scmodels.preprocess import ...``) makes Python set
    the package attribute to the module; here that attribute becomes the function instead."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "preprocess" and isinstance(value, types.ModuleType):
            value = value.preprocess
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
