"""scpretrain: pretraining of single-cell foundation models (``scpretrain.train``, ``.sharding``,
``.data_loader``, ``.launch``) and their downstream use (``scpretrain.evaluate``, ``scpretrain.scmodels``).

Installed, every part lives under this one name (no top-level ``evaluate`` or ``train`` in
site-packages). In a checkout the parts are the top-level folders ``train/``, ``evaluate/``, ...;
this package then lists the checkout's root in its ``__path__``, so ``scpretrain.train`` is that
folder and the same imports work with or without installing.
"""
from __future__ import annotations

from pathlib import Path as _Path

__version__ = "0.2.0"

_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "scmodels" / "__init__.py").is_file():
    __path__.append(str(_root))  # a checkout: scpretrain.train is <checkout>/train  # noqa: F821
