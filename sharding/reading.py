"""Reading the sources for a build: each source's metadata checked up front (``plan_source``), then its row
blocks validated, cast, aligned to the vocabulary and filtered by --min-genes (``prepared``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from scpretrain.sharding import manifest as mf
from scpretrain.sharding.config import BuildConfig, keep_columns
from scpretrain.sharding.obs import ObsPlan, plan_obs
from scpretrain.sharding.sources import Source
from scpretrain.sharding.validate import (
    ValueFaults,
    check_unique,
    genes_per_cell,
    parse_holdout,
    small_counts,
)
from scpretrain.sharding.vocab import Alignment, Vocab, align, check_coverage


@dataclass
class SourcePlan:
    source: Source
    alignment: Alignment
    obs: ObsPlan


def plan_source(source: Source, vocab: Vocab, cfg: BuildConfig, log: Callable[[str], None]) -> SourcePlan:
    """Every metadata check, before a single row is read or written."""
    where = source.spec
    check_unique(source.genes.names, file=where, field="var", fix="gene ids must be unique "
                 "(drop or rename the duplicated genes, e.g. var_names_make_unique(), and re-save)")
    cell_ids = source.cell_ids()
    if cell_ids is not None:
        check_unique(cell_ids, file=where, field="obs", fix="cell ids must be unique within a file "
                     "(obs_names_make_unique() and re-save)")
    alignment = align(source.genes, vocab)
    log(f"{where}: {alignment.describe()}")
    check_coverage(alignment, file=where, min_coverage=cfg.min_coverage)
    obs = plan_obs(source, keep=keep_columns(cfg), label_key=cfg.label_key,
                   dataset_key=cfg.dataset_key, holdout=parse_holdout(cfg.holdout, cfg.seed))
    for note in obs.notes:
        log(note)
    return SourcePlan(source, alignment, obs)


def fingerprint(cfg: BuildConfig, sources: list[Source], vocab: Vocab) -> str:
    # jobs only changes how fast the same shards are written
    decided = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite", "progress", "jobs")}
    decided["vocab"] = mf.vocab_sha256(vocab.gene_ids)
    decided["sources"] = [s.fingerprint() for s in sources]
    return hashlib.sha256(json.dumps(decided, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Prepared:
    """One source block, validated, cast, aligned to the vocabulary and filtered by --min-genes."""

    n_in: int
    faults: ValueFaults
    counts: Any = None  # CSR (uint16 or float32) over the vocabulary, kept cells only (None once faults are seen)
    keep: np.ndarray | None = None
    columns: dict[str, np.ndarray] | None = None


def prepared(plan: SourcePlan, cfg: BuildConfig, start: int = 0, stop: int | None = None) -> Iterator[Prepared]:
    """The per-block work that needs no build state, so it can run ahead of dealing and spooling."""
    clean = ValueFaults()
    for block in plan.source.blocks(cfg.block_rows, plan.obs.read_columns, start, stop):
        faults = ValueFaults()
        small = small_counts(block.counts.data)  # the common case, checked in one pass: no faults
        if small is None:
            faults.add(block.counts.data)
        clean.merge(faults)
        n = block.counts.shape[0]
        if not clean.is_clean(cfg.allow_non_integer):
            yield Prepared(n, faults)  # only counting bad values from here on
            continue
        src = block.counts
        if small is not None:  # uint16 counts: half the bytes through every later copy and the spool
            counts = sp.csr_matrix((small, src.indices, src.indptr), shape=src.shape)
            if np.count_nonzero(small) < small.size:  # explicit zeros: removed in place, so on a copy
                counts = counts.copy()
                counts.eliminate_zeros()
        else:
            counts = src.astype(np.float32)
            counts.eliminate_zeros()
        counts = plan.alignment.apply(counts)
        keep = genes_per_cell(counts) >= cfg.min_genes
        kept = counts if keep.all() else counts[keep]
        yield Prepared(n, faults, kept, keep, plan.obs.derive(block.obs, n))


def source_stats(plan: SourcePlan, kept: int, dropped: int) -> dict[str, Any]:
    src = plan.source
    facts = {k: mf.redact(v) if isinstance(v, str) else v for k, v in src.provenance().items()}
    return {"spec": mf.redact(src.spec), "kind": src.kind, "sha256": src.sha256(), **facts,
            "n_cells_in": src.n_cells, "n_cells_kept": kept, "n_dropped_min_genes": dropped,
            "matrix": src.matrix, "gene_coverage": round(plan.alignment.gene_coverage, 6),
            "vocab_coverage": round(plan.alignment.vocab_coverage, 6),
            "matched_by": plan.alignment.matched_by}
