"""The one exception type of the downstream module.

Every message names the file (or object), the field and the fix, so the CLI can
print it as a single ``error: ...`` line without a traceback.
"""
from __future__ import annotations


class EvaluateError(ValueError):
    """Bad input to ``evaluate``: an incomplete export, too few matching genes, unusable labels."""
