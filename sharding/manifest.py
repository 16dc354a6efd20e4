"""The corpus contract on disk: manifest.json, vocab.tsv and shard checksums.

Both sides use this module: the builder writes through it and the loader reads
through it, so a checksum or a path rule is defined exactly once.

A corpus exists only once ``manifest.json`` exists: it is written last, to a
temporary file that is fsynced and then renamed over the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from scpretrain.scmodels.atomic import (
    file_sha256,  # noqa: F401  (re-exported: mf.file_sha256)
    write_atomic,  # noqa: F401 - the corpus's files are written with it
)
from scpretrain.scmodels.genes import (  # noqa: F401
    VOCAB_FILE,
    VOCAB_HEADER,
    format_vocab,
    parse_vocab,
    vocab_sha256,  # noqa: F401 - the one vocabulary hash
)
from scpretrain.sharding.errors import InputError

FORMAT_VERSION = 1
TOOL = "scpretrain 0.1.0"
MANIFEST = "manifest.json"
MANIFEST_TMP = ".manifest.json.tmp"
VOCAB = VOCAB_FILE
_HASH_BLOCK = 1 << 20



def write_vocab(path: str | Path, genes: Iterable[tuple[str, str]]) -> None:
    """Write vocab.tsv (``scmodels.genes.format_vocab``) atomically."""
    write_atomic(Path(path), format_vocab(genes).encode())


def read_vocab(corpus_dir_or_file: str | Path) -> list[tuple[str, str]]:
    """Read vocab.tsv (a corpus directory or the file itself) as [(gene_id, symbol)] in column order."""
    path = Path(corpus_dir_or_file)
    if path.is_dir():
        path = path / VOCAB
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the vocabulary ({exc}); pass a vocab.tsv file") from None
    try:
        return parse_vocab(text, str(path))
    except ValueError as e:
        raise InputError(str(e)) from None


def shard_sha256(shard_dir: str | Path, known: dict[str, bytes] | None = None) -> str:
    """Checksum of a Zarr shard's counts: every file under ``X/``, sorted by relative path.

    Each file contributes its relative POSIX path, a NUL byte, then its bytes, so
    renaming or deleting a chunk changes the checksum as surely as corrupting it.
    ``known``: the bytes of files just written (relative path -> bytes), used instead of reading them back.
    """
    root = Path(shard_dir) / "X"
    if not root.is_dir():
        raise InputError(f"{shard_dir}: no X/ directory; the shard is missing or incomplete "
                         "(rebuild the corpus)")
    h = hashlib.sha256()
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    for rel, p in files:
        h.update(rel.encode() + b"\0")
        if known is not None and rel in known:
            h.update(known[rel])
            continue
        with open(p, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
    return h.hexdigest()


def write_manifest(corpus_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Publish the corpus: write .manifest.json.tmp, fsync it, rename it to manifest.json."""
    corpus = Path(corpus_dir)
    data = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    return write_atomic(corpus / MANIFEST, data, tmp=corpus / MANIFEST_TMP)


def read_manifest(corpus_dir: str | Path) -> dict[str, Any]:
    """Read and check a corpus manifest.

    Raises InputError when the manifest is missing (the corpus is incomplete),
    unreadable, of another format version, or names a path that is absolute or
    resolves outside the corpus directory (a corpus must never reach outside itself).
    """
    corpus = Path(corpus_dir)
    path = corpus / MANIFEST
    if not path.is_file():
        raise InputError(f"{corpus}: no manifest.json; this is not a complete corpus "
                         "(re-run `python -m sharding build`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc}); rebuild the corpus") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: manifest must be a JSON object; rebuild the corpus")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(f"{path}: format_version is {version!r}, this tool reads {FORMAT_VERSION}; "
                         "rebuild the corpus with this version")
    for rel in manifest_paths(manifest):
        resolve_inside(corpus, rel, field=f"{path}")
    return manifest


def manifest_paths(manifest: dict[str, Any]) -> list[str]:
    """Every filesystem path a manifest names (all must be relative to the corpus)."""
    paths = [manifest.get("vocab", {}).get("path", VOCAB)]
    for shard in (manifest.get("zarr") or {}).get("shards", []):
        paths.append(shard.get("path", ""))
    if manifest.get("soma"):
        paths.append(manifest["soma"].get("path", ""))
    return paths


def resolve_inside(corpus_dir: str | Path, rel: str, field: str = "manifest") -> Path:
    """Resolve a manifest path, refusing absolute paths and any that escape the corpus directory."""
    corpus = Path(corpus_dir).resolve()
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        raise InputError(f"{field}: path {rel!r} must be relative to the corpus directory; "
                         "refusing a corpus that points outside itself")
    target = (corpus / rel).resolve()
    if target != corpus and corpus not in target.parents:
        raise InputError(f"{field}: path {rel!r} resolves outside the corpus directory; "
                         "refusing a corpus that points outside itself")
    return target


def _first_duplicates(names: Iterable[str], limit: int = 5) -> list[str]:
    seen: set[str] = set()
    dups: list[str] = []
    for name in names:
        if name in seen and name not in dups:
            dups.append(name)
            if len(dups) >= limit:
                break
        seen.add(name)
    return dups


_USERINFO = re.compile(r"://((?:(?!://)[^@\s])*)@")  # the userinfo of the innermost URI (may hold '/')
_SECRET_PARAM = re.compile(r"([?&;](?:token|access_token|password|passwd|pwd|secret|api_key|apikey|key|sig|"
                           r"signature|x-amz-signature|x-amz-credential|credential)=)[^&#\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """Hide credentials in URIs, wherever they are written (manifest, run config, MLflow params, logs):
    ``s3://user:secret@host`` -> ``s3://user:***@host`` (also with '/' in the password),
    ``https://TOKEN@host`` -> ``https://***@host``, ``?token=abc`` / ``&sig=...`` -> ``?token=***``."""
    def hide(m: re.Match) -> str:
        info = m.group(1)
        while "://" in info:  # nested URIs (soma://s3://user:pw@host): the last scheme owns the userinfo
            info = info.split("://", 1)[1]
        head = m.group(1)[: len(m.group(1)) - len(info)]
        user = info.split(":", 1)[0] + ":***" if ":" in info else "***"
        return f"://{head}{user}@"

    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(hide, text))


def redact_tree(obj: Any) -> Any:
    """``redact`` applied to every string of a nested dict / list (a config before it is written)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_tree(v) for v in obj]
    return obj
