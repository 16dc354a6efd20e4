"""`inspect` (a readable summary) and `verify` (recompute everything the manifest promises)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scpretrain.sharding import manifest as mf
from scpretrain.sharding import zarr_store

_TOP = 10


def summarize(corpus_dir: str | Path, manifest: dict[str, Any] | None = None) -> str:
    """A human summary of a corpus: cells, genes, datasets, labels, splits, shards, sources."""
    out = Path(corpus_dir)
    m = manifest if manifest is not None else mf.read_manifest(out)
    n, g, nnz = m["n_cells"], m["n_genes"], m["nnz"]
    lines = [f"corpus {out} ({m['tool']}, format {m['format_version']}, built {m['created']})",
             f"  cells {n:,}  genes {g:,}  nnz {nnz:,} ({nnz / max(1, n * g):.2%} non-zero, "
             f"{nnz / max(1, n):,.0f} per cell)",
             f"  obs columns: {', '.join(m['obs_columns'])}"]
    if m.get("zarr"):
        shards = m["zarr"]["shards"]
        sizes = sorted(s["n_cells"] for s in shards)
        disk = sum(_du(out / s["path"]) for s in shards)
        lines.append(f"  zarr: {len(shards)} shards, cells per shard min {sizes[0]:,} / median "
                     f"{sizes[len(sizes) // 2]:,} / max {sizes[-1]:,}, {_mb(disk)} on disk, "
                     f"codec {m['zarr'].get('codec', '?')}")
    if m.get("soma"):
        lines.append(f"  soma: {m['soma']['n_cells']:,} cells, {_mb(_du(out / m['soma']['path']))} on disk")
    lines.append(_counts("datasets", m["datasets"]))
    lines.append(_counts("labels", m["labels"]))
    for name, split in m.get("splits", {}).items():
        chosen = (f"{split['fraction']:.0%} of {split['by']} values by hash ({len(split['values'])} held out)"
                  if "fraction" in split else f"{split['by']} in {split['values']}")
        lines.append(f"  split {name}: {chosen}: {split['n_cells']:,} cells")
    lines.append("  sources:")
    for s in m["sources"]:
        where = f" where {s['filter']}" if s.get("filter") and s["filter"] not in s["spec"] else ""
        build = f" (Census build {s['census_build_date']})" if s.get("census_build_date") else ""
        lines.append(f"    {s['spec']}{where}{build}: kept {s['n_cells_kept']:,} of {s['n_cells_in']:,} "
                     "cells "
                     f"({s['n_dropped_min_genes']:,} below --min-genes), counts from {s['matrix']}, "
                     f"{s['gene_coverage']:.1%} of its genes matched, "
                     f"{s['vocab_coverage']:.1%} of vocab covered")
    return "\n".join(lines)


def verify(corpus_dir: str | Path) -> list[str]:
    """Everything that disagrees with the manifest, one line each naming the file; empty means OK.

    Checks the vocabulary hash, every Zarr shard's chunk presence, shape, nnz and
    checksum (a missing chunk would otherwise read as zeros), and the SOMA
    experiment's shape and nnz. Raises InputError if the manifest itself is bad.
    """
    out = Path(corpus_dir)
    m = mf.read_manifest(out)
    problems = _check_vocab(out, m)
    if m.get("zarr"):
        shards = m["zarr"]["shards"]
        for s in shards:
            problems += [f"{s['path']}: {p}" for p in _check_zarr_shard(out, s, m["n_genes"])]
        if sum(s["n_cells"] for s in shards) != m["n_cells"] or sum(s["nnz"] for s in shards) != m["nnz"]:
            problems.append("manifest.json: shard cells/nnz do not add up to n_cells/nnz")
    if m.get("soma"):
        from scpretrain.sharding import soma_store  # only corpora with a SOMA store import tiledbsoma

        soma = m["soma"]
        uri = mf.resolve_inside(out, soma["path"])
        problems += [f"{soma['path']}: {p}" for p in soma_store.check_experiment(
            uri, n_cells=soma["n_cells"], n_genes=m["n_genes"], nnz=soma["nnz"])]
    return problems


def _check_vocab(out: Path, m: dict[str, Any]) -> list[str]:
    path = m["vocab"]["path"]
    try:
        ids = [gid for gid, _ in mf.read_vocab(mf.resolve_inside(out, path))]
    except Exception as exc:  # InputError or an OS error: report, keep verifying the rest
        return [f"{path}: {exc}"]
    problems = []
    if mf.vocab_sha256(ids) != m["vocab"]["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest's vocab.sha256")
    if len(ids) != m["n_genes"]:
        problems.append(f"{path}: {len(ids)} genes, manifest says {m['n_genes']}")
    return problems


def _check_zarr_shard(out: Path, shard: dict[str, Any], n_genes: int) -> list[str]:
    path = mf.resolve_inside(out, shard["path"])
    if not path.is_dir():
        return ["shard is missing"]
    problems = zarr_store.check_shard(path, n_cells=shard["n_cells"], n_genes=n_genes, nnz=shard["nnz"])
    if (path / "X").is_dir() and mf.shard_sha256(path) != shard["sha256"]:
        problems.append("X checksum (sha256) differs from the manifest: a chunk was changed or removed")
    return problems


def _counts(name: str, counts: dict[str, int]) -> str:
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{k} {v:,}" for k, v in top[:_TOP])
    more = f", ... (+{len(top) - _TOP} more)" if len(top) > _TOP else ""
    return f"  {name} ({len(counts)}): {shown}{more}"


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
