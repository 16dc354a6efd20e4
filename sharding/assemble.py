"""The manifest a build publishes (``manifest.json``), assembled from the build's state and its shards' records."""
from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from scpretrain.sharding import manifest as mf
from scpretrain.sharding import zarr_store
from scpretrain.sharding.validate import parse_holdout

if TYPE_CHECKING:
    from scpretrain.sharding.config import BuildConfig
    from scpretrain.sharding.vocab import Vocab

COUNTED = ("cell_type", "dataset_id", "split")  # per-shard tallies summed into the manifest
CATEGORICAL_MAX = 4096  # text obs columns with at most this many values are stored as categoricals


def assemble_manifest(state: dict[str, Any], shards: list[dict[str, Any]], cfg: BuildConfig, vocab: Vocab,
                      string_cols: list[str]) -> dict[str, Any]:
    """The manifest a build publishes, from its state and the shards' done records."""
    cats = state["categories"]
    counts = _column_counts(shards)
    split = parse_holdout(cfg.holdout, cfg.seed)
    n_cells, nnz = state["n_cells"], int(sum(s["nnz"] for s in shards))
    return {
        "format_version": mf.FORMAT_VERSION,
        "tool": mf.TOOL,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "n_cells": n_cells, "n_genes": len(vocab), "nnz": nnz,
        "vocab": {"path": mf.VOCAB, "sha256": mf.vocab_sha256(vocab.gene_ids)},
        "obs_columns": ["cell_id"] + string_cols,
        "obs_categories": {c: list(cats[c]) for c in string_cols if len(cats[c]) <= CATEGORICAL_MAX},
        "zarr": None if cfg.format == "soma" else {"shards": [
            {"path": f"zarr/shard-{i:05d}.zarr", "n_cells": s["n_cells"], "nnz": s["nnz"],
             "sha256": s["sha256"]}
            for i, s in enumerate(shards)], "codec": cfg.codec, "chunk_nnz": zarr_store.CHUNK_NNZ,
            # the widest stored dtype over the shards: what the loader hands out for every batch
            "dtypes": {k: str(np.result_type(*[s["dtypes"][k] for s in shards])) for k in ("indices", "data")}},
        "soma": None if cfg.format == "zarr" else {"path": "soma", "n_cells": n_cells, "nnz": nnz, "dtypes": {
            # a shard done by an older version recorded none: the widest then
            k: str(np.result_type("uint16", *[s.get("soma_dtypes", {}).get(k, wide) for s in shards]))
            for k, wide in (("indices", "int32"), ("data", "float32"))}},
        "splits": {} if split is None else {"holdout": {
            "by": split.column, **({"fraction": split.fraction} if split.fraction is not None else {}),
            "values": list(split.values) if split.fraction is None else state["holdout_values"],
            "n_cells": counts["split"].get("holdout", 0)}},
        "labels": counts["cell_type"],
        "datasets": counts["dataset_id"],
        "sources": state["sources"],
        "build": {"seed": cfg.seed, "cells_per_shard": cfg.cells_per_shard, "min_genes": cfg.min_genes,
                  "codec": cfg.codec, "x_dtype": cfg.x_dtype,
                  "categories_seen": {c: len(v) for c, v in cats.items()}},
    }


def _column_counts(shards: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    # tallied per shard in its done record (so a resumed build still has them), summed here
    totals: dict[str, Counter] = {c: Counter() for c in COUNTED}
    for s in shards:
        for col, counter in totals.items():
            counter.update(s["counts"][col])
    return {c: dict(sorted(v.items())) for c, v in totals.items()}
