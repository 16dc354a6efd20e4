"""Source specs -> sources that yield row blocks of counts with their obs.

  data/a.h5ad, 'data/*.h5ad'              an AnnData h5ad file, or a glob (one source per file)
  sample1/outs/filtered_feature_bc_matrix a 10x Matrix Market directory (matrix.mtx(.gz), features/barcodes)
  sample1/filtered_feature_bc_matrix.h5   a CellRanger h5 (v3 or v2 layout)
  soma://PATH[?measurement=RNA&layer=raw&filter=<obs value filter>]   a TileDB-SOMA Experiment
  census:ORGANISM or census://ORGANISM[?uri=&version=&filter=]        the CELLxGENE Census
  synthetic://cells=N,genes=G,...         the synthetic atlas (see ``sharding/synthetic.py``)

Opening a source reads metadata only (genes, cell count, obs column names); the
build then pulls blocks of rows.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

import h5py

from scpretrain.sharding.errors import InputError
from scpretrain.sharding.sources.base import Block, Source
from scpretrain.sharding.sources.soma import CensusOptions
from scpretrain.sharding.synthetic import PREFIX as SYNTHETIC_PREFIX
from scpretrain.sharding.synthetic import SyntheticAtlas, SyntheticParams
from scpretrain.sharding.vocab import SourceGenes, Vocab

__all__ = ["Block", "CensusOptions", "Source", "open_sources"]

SOMA_PREFIX = "soma://"
CENSUS_PREFIXES = ("census://", "census:")
_FORMS = ("an .h5ad file or glob, a 10x matrix.mtx directory or .h5, soma://PATH, census:ORGANISM, "
          "or synthetic://cells=N,genes=G")


class SyntheticSource(Source):
    def __init__(self, spec: str, vocab: Vocab | None):
        params = SyntheticParams.parse(spec)
        if vocab is not None:
            if params.genes > len(vocab):
                raise InputError(f"{spec}: genes={params.genes} but the vocabulary has only {len(vocab)} "
                                 "genes; lower genes= or pass a larger --vocab")
            ids, symbols = vocab.gene_ids[:params.genes], vocab.symbols[:params.genes]
        else:
            ids = [f"SYNG{j + 1:05d}" for j in range(params.genes)]
            symbols = ids
        super().__init__(spec=spec, kind="synthetic", path=None, n_cells=params.cells,
                         genes=SourceGenes(list(ids), {"symbol": list(symbols)}), matrix="synthetic",
                         obs_columns=["cell_type", "dataset_id", "donor_id"])
        self.atlas = SyntheticAtlas(params)

    def blocks(self, rows: int, columns: list[str], start: int = 0, stop: int | None = None) -> Iterator[Block]:
        stop = self.n_cells if stop is None else min(stop, self.n_cells)
        for first in range(start, stop, rows):
            counts, obs = self.atlas.generate(first, min(first + rows, stop))
            yield Block(first, counts, obs[[c for c in columns if c in obs.columns]])


def open_sources(specs: list[str], *, matrix: str | None, vocab: Vocab | None,
                 census: CensusOptions | None = None) -> list[Source]:
    """Expand specs (globs -> one source per file) and open each; nothing is read beyond metadata."""
    census = census if census is not None else CensusOptions()
    sources: list[Source] = []
    try:
        for spec in specs:
            sources.extend(_open(spec, matrix=matrix, vocab=vocab, census=census))
    except BaseException:
        for s in sources:
            s.close()
        raise
    return sources


def _open(spec: str, *, matrix: str | None, vocab: Vocab | None, census: CensusOptions) -> Iterator[Source]:
    if spec.startswith(SYNTHETIC_PREFIX):
        yield SyntheticSource(spec, vocab)
        return
    if spec.startswith(SOMA_PREFIX):
        from scpretrain.sharding.sources.soma import open_soma_source

        yield open_soma_source(spec, SOMA_PREFIX)
        return
    for prefix in CENSUS_PREFIXES:
        if spec.startswith(prefix):
            from scpretrain.sharding.sources.soma import open_census_source

            yield open_census_source(spec, prefix, census)
            return
    for path in _expand(spec):
        yield _open_path(path, matrix)


def _open_path(path: Path, matrix: str | None) -> Source:
    from scpretrain.sharding.sources.h5ad import H5adSource
    from scpretrain.sharding.sources.tenx import TenxH5Source, TenxMtxSource, find_mtx

    if path.name in ("matrix.mtx", "matrix.mtx.gz"):
        path = path.parent
    if path.is_dir():
        if find_mtx(path) is None:
            raise InputError(f"{path}: is a directory without matrix.mtx(.gz); pass {_FORMS}")
        return _tenx(TenxMtxSource(path), matrix)
    if path.suffix == ".h5ad":
        return H5adSource(path, matrix)
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            is_anndata = "obs" in f and "var" in f
        if is_anndata:
            return H5adSource(path, matrix)
        return _tenx(TenxH5Source(path), matrix)
    if path.suffix == ".h5":
        return TenxH5Source(path)  # not HDF5 at all: it reports the file as unreadable
    raise InputError(f"{path}: unsupported file type; pass {_FORMS}")


def _tenx(source: Source, matrix: str | None) -> Source:
    if matrix is not None:
        source.notes.append(f"{source.spec}: --matrix {matrix} ignored (it applies to h5ad files; a 10x "
                            "output holds one matrix)")
    return source


def _expand(spec: str) -> list[Path]:
    if "://" in spec:
        raise InputError(f"{spec}: unsupported source scheme; pass {_FORMS}")
    paths = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    paths = [p for p in paths if os.path.exists(p)]
    if not paths:
        raise InputError(f"{spec}: no file matches this source; pass {_FORMS}")
    return [Path(p) for p in paths]
