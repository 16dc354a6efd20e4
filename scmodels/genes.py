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


VOCAB_FILE = "vocab.tsv"  # a corpus's, a checkpoint's and an export's model columns, in order
VOCAB_HEADER = "gene_id\tsymbol"


def format_vocab(genes: Iterable[tuple[str, str]]) -> str:
    """vocab.tsv text: the header, then one ``gene_id<TAB>symbol`` row per model column."""
    return "\n".join([VOCAB_HEADER, *(f"{gid}\t{sym}" for gid, sym in genes)]) + "\n"


def parse_vocab(text: str, where: str) -> list[tuple[str, str]]:
    """[(gene_id, symbol)] from vocab.tsv text; ``ValueError`` naming ``where``, the line and the fix."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != VOCAB_HEADER:
        raise ValueError(f"{where}: first line must be the header 'gene_id<TAB>symbol'; add it")
    genes: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0]:
            raise ValueError(f"{where}: line {lineno} is {line!r}; it must be 'gene_id<TAB>symbol'")
        genes.append((fields[0], fields[1]))
    if not genes:
        raise ValueError(f"{where}: the vocabulary has no genes; list one gene per line after the header")
    ids = [g for g, _ in genes]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dups = list(dict.fromkeys(g for g in ids if g in seen or seen.add(g)))[:5]
        raise ValueError(f"{where}: gene_id has {len(ids) - len(set(ids))} duplicates (e.g. {', '.join(dups)}); "
                         "each gene_id must appear once")
    return genes


# the name both callers used before
strip_version = normalize_gene_id
