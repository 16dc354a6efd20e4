"""Gene identifiers: the one normalization used wherever genes are matched (corpus builds, exports, evaluate).

Pure Python (importing it through the package loads torch, which every stage has installed).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

# The export layout (config.json + model.safetensors + vocab.tsv) written by train/export.py and read by
# evaluate/export_io.py: one number for both sides.
EXPORT_FORMAT_VERSION = 1

# An Ensembl stable id of any feature type and species (ENSG, ENST, ENSP, ENSMUSG, ...), an optional
# ".<version>", and an optional suffix such as "_PAR_Y" (a distinct gene on the Y pseudo-autosomal region).
ENSEMBL_ID = re.compile(r"^(ENS[A-Z]*[GTPE]\d{6,})(\.\d+)?(_PAR_[XY])?$")
# Gene ids only (ENSG, ENSMUSG, ...): what decides that a column "is Ensembl gene ids".
ENSEMBL_GENE_ID = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?(_PAR_[XY])?$")


def normalize_gene_id(gene_id: str) -> str:
    """The key two gene names are matched by: surrounding whitespace dropped, an Ensembl id's version dropped.

    ``ENSG00000141510.17`` -> ``ENSG00000141510``; ``ENSG00000182378.14_PAR_Y`` ->
    ``ENSG00000182378_PAR_Y`` (kept distinct from the X copy); ``ENST00000269305.9`` ->
    ``ENST00000269305``; symbols are returned as they are (``AC000061.1``, ``MT-CO1``: a dot
    in a symbol is part of the name).
    """
    text = str(gene_id).strip()
    m = ENSEMBL_ID.match(text)
    return m.group(1) + (m.group(3) or "") if m else text


def vocab_sha256(gene_ids: Iterable[str]) -> str:
    """The vocabulary hash a model, an export and a corpus must agree on: sha256 of the ordered ids joined
    by newlines (corpus manifests, checkpoints and exports all carry it)."""
    return hashlib.sha256("\n".join(gene_ids).encode()).hexdigest()


# the name both callers used before
strip_version = normalize_gene_id
