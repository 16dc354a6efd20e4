"""TileDB-SOMA experiments as sources: a local or remote experiment, or a CELLxGENE Census slice.

Cells are the soma_joinids that pass the obs value filter, read in row blocks: X by
coordinates (a slice when the ids of a block are contiguous) as Arrow, turned into
CSR over the measurement's var, and the block's obs columns by the same ids.

The Census is opened through ``cellxgene_census.open_soma`` (a version, or ``uri``
for a copy with the Census layout: ``census_data/<organism>`` is an Experiment with
measurement ``RNA``, X layer ``raw``, var ``feature_id``/``feature_name``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from scpretrain.sharding.errors import InputError
from scpretrain.sharding.sources.base import Block, Source, first_line, source_genes
from scpretrain.sharding.vocab import ID_COLUMNS

MEASUREMENT = "RNA"
LAYER = "raw"
# where a var's gene names may live when no id column is present (tiledbsoma.io writes var_id)
_VAR_NAME_COLUMNS = ID_COLUMNS + ("var_id", "gene", "index", "_index")
_PRIMARY = "is_primary_data"


@dataclass(frozen=True)
class CensusOptions:
    """``--census-uri``, ``--census-version``, ``--census-filter``; a spec's ``?uri=&version=&filter=``
    wins over them."""

    uri: str | None = None
    version: str | None = None
    filter: str | None = None


def parse_spec(spec: str, prefix: str, allowed: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """``PREFIX BODY?key=v&key=v&filter=...`` -> (BODY, params). ``filter`` runs to the end of the spec."""
    body, _, query = spec[len(prefix):].partition("?")
    params: dict[str, str] = {}
    while query:
        item, _, rest = query.partition("&")
        key, sep, value = item.partition("=")
        if key == "filter":
            value, rest = query[len("filter="):], ""  # a filter may itself hold '&'
        if not sep or key not in allowed:
            raise InputError(f"{spec}: unknown option {item!r}; allowed: {', '.join(allowed)} "
                             f"(e.g. {prefix}{body or 'PATH'}?{allowed[0]}=...)")
        params[key] = value
        query = rest
    return body, params


class SomaSource(Source):
    """Cells of one Experiment that pass an obs value filter."""

    def __init__(self, spec: str, exp: Any, *, kind: str, uri: str, measurement: str, layer: str,
                 value_filter: str | None, owner: Any = None):
        self.exp, self._owner, self.uri, self.filter = exp, owner, uri, value_filter
        self.measurement, self.layer = measurement, layer
        try:
            ms = _child(spec, exp.ms, measurement, "measurement", "measurement=")
            self.X = _child(spec, ms.X, layer, "X layer", "layer=")
            var = ms.var.read().concat().to_pandas()
            obs_columns = [n for n in exp.obs.schema.names if n != "soma_joinid"]
            self.ids = self._filtered_ids(spec)
            self.layer_nnz = int(self.X.nnz)
        except InputError:
            self.close()
            raise
        except Exception as exc:  # tiledbsoma raises several types for a damaged or foreign store
            self.close()
            raise InputError(f"{spec}: cannot read the experiment ({first_line(exc)}); check the path and "
                             "that it is a TileDB-SOMA Experiment") from None
        joinids = var["soma_joinid"].to_numpy()
        self._var_pos = np.full(int(joinids.max()) + 1 if joinids.size else 0, -1, dtype=np.int64)
        self._var_pos[joinids] = np.arange(joinids.size)
        name_col = next((c for c in _VAR_NAME_COLUMNS if c in var.columns), None)
        var.index = pd.Index(var[name_col] if name_col else var["soma_joinid"]).astype(str)
        matrix = f"ms['{measurement}'].X['{layer}']"
        super().__init__(spec=spec, kind=kind, path=None, n_cells=int(self.ids.size), genes=source_genes(var),
                         matrix=matrix, obs_columns=obs_columns)
        if self.n_cells == 0:
            self.close()
            what = f"the obs filter {value_filter!r}" if value_filter else "obs"
            raise InputError(f"{spec}: {what} selects no cells; check the filter's column names and values")
        self.notes.append(f"{spec}: {self.n_cells:,} cells from {matrix}"
                          + (f" where {value_filter}" if value_filter else ""))
        if _PRIMARY in obs_columns and _PRIMARY not in (value_filter or ""):
            self.notes.append(f"{spec}: the filter does not mention {_PRIMARY}, so cells present in several "
                              f"datasets are included more than once (add `{_PRIMARY} == True` to avoid "
                              "that)")

    @property
    def dataset_default(self) -> str:
        return Path(self.uri.rstrip("/")).name or self.spec

    def fingerprint(self) -> dict[str, Any]:
        return {"spec": self.spec, "n_cells": self.n_cells, "layer_nnz": self.layer_nnz, **self.provenance()}

    def provenance(self) -> dict[str, Any]:
        return {"uri": self.uri, "measurement": self.measurement, "layer": self.layer, "filter": self.filter}

    def blocks(self, rows: int, columns: list[str], begin: int = 0, stop: int | None = None) -> Iterator[Block]:
        wanted = [c for c in columns if c in self.obs_columns]
        end = self.n_cells if stop is None else min(stop, self.n_cells)
        for start in range(begin, end, rows):
            ids = self.ids[start:min(start + rows, end)]
            try:
                csr = self._counts(ids)
                obs = self._obs(ids, wanted)
            except InputError:
                raise
            except Exception as exc:  # see __init__
                raise InputError(f"{self.spec}: cannot read cells {start}-{start + ids.size} "
                                 f"({first_line(exc)}); the experiment is damaged or was changed during the "
                                 "build (re-run, or repair the store)") from None
            yield Block(start, csr, obs)

    def close(self) -> None:
        for obj in (self.exp, self._owner):
            if obj is not None:
                obj.close()

    def _filtered_ids(self, spec: str) -> np.ndarray:
        try:
            table = self.exp.obs.read(column_names=["soma_joinid"], value_filter=self.filter).concat()
        except Exception as exc:  # a bad filter surfaces as SOMAError, ValueError or TileDBError
            if self.filter is None:
                raise
            columns = ", ".join(n for n in self.exp.obs.schema.names if n != "soma_joinid")
            raise InputError(f"{spec}: the obs filter {self.filter!r} is invalid ({first_line(exc)}); write "
                             "it like \"tissue_general == 'lung' and is_primary_data == True\" using obs "
                             f"columns: {columns}") from None
        return np.sort(table["soma_joinid"].to_numpy())

    def _counts(self, ids: np.ndarray) -> sp.csr_matrix:
        lo, hi = int(ids[0]), int(ids[-1])
        coords = slice(lo, hi) if hi - lo + 1 == ids.size else pa.array(ids)
        table = self.X.read(coords=(coords, slice(None))).tables().concat()
        rows = np.searchsorted(ids, table["soma_dim_0"].to_numpy())
        cols = self._var_pos[table["soma_dim_1"].to_numpy()]
        if cols.size and cols.min() < 0:
            raise InputError(f"{self.spec}: {self.matrix} has entries for genes missing from var; the store "
                             "is inconsistent (repair or re-create it)")
        values = table["soma_data"].to_numpy()
        return sp.csr_matrix((values, (rows, cols)), shape=(ids.size, len(self.genes.names)))

    def _obs(self, ids: np.ndarray, columns: list[str]) -> pd.DataFrame:
        frame = pd.DataFrame(index=pd.Index(ids.astype(str)))
        if not columns:
            return frame
        table = self.exp.obs.read(coords=(pa.array(ids),), column_names=["soma_joinid", *columns]).concat()
        got = table.to_pandas().set_index("soma_joinid").reindex(ids)
        got.index = frame.index
        return got


def open_soma_source(spec: str, prefix: str) -> SomaSource:
    """``soma://PATH[?measurement=RNA&layer=raw&filter=<obs value filter>]``."""
    uri, params = parse_spec(spec, prefix, ("measurement", "layer", "filter"))
    if not uri:
        raise InputError(f"{spec}: no experiment path; write soma://PATH (e.g. soma://data/atlas.soma)")
    try:
        import tiledbsoma as soma  # here: a build from other sources never imports it

        exp = soma.Experiment.open(uri)
    except Exception as exc:  # DoesNotExistError, SOMAError (not an Experiment), TileDBError
        raise InputError(f"{spec}: cannot open a TileDB-SOMA Experiment at {uri} ({first_line(exc)}); "
                         "check the path") from None
    return SomaSource(spec, exp, kind="soma", uri=uri, measurement=params.get("measurement", MEASUREMENT),
                      layer=params.get("layer", LAYER), value_filter=params.get("filter") or None)


class CensusSource(SomaSource):
    """One organism of the CELLxGENE Census, opened through ``cellxgene_census``."""

    def __init__(self, spec: str, census: Any, exp: Any, *, organism: str, uri: str | None,
                 version: str | None, build_date: str | None, value_filter: str | None):
        self.organism, self.census_uri, self.version, self.build_date = organism, uri, version, build_date
        super().__init__(spec, exp, kind="census", uri=uri or f"census:{version or 'stable'}",
                         measurement=MEASUREMENT, layer=LAYER, value_filter=value_filter, owner=census)

    @property
    def dataset_default(self) -> str:
        return f"census_{self.organism}"

    def provenance(self) -> dict[str, Any]:
        return {"organism": self.organism, "census_uri": self.census_uri, "census_version": self.version,
                "census_build_date": self.build_date, "filter": self.filter}


def open_census_source(spec: str, prefix: str, options: CensusOptions) -> CensusSource:
    """``census:ORGANISM`` or ``census://ORGANISM[?uri=&version=&filter=]``; spec options override
    ``options``."""
    import cellxgene_census  # imported here: only Census builds pay for it

    organism, params = parse_spec(spec, prefix, ("uri", "version", "filter"))
    uri = params.get("uri") or options.uri
    version = params.get("version") or options.version
    value_filter = params.get("filter") or options.filter or None
    if not organism:
        raise InputError(f"{spec}: no organism; write census:homo_sapiens or census:mus_musculus")
    where = f"the Census at {uri}" if uri else f"Census version {version or 'stable'!r}"
    try:
        census = cellxgene_census.open_soma(uri=uri, census_version=version or "stable")
    except Exception as exc:  # requests, ValueError (unknown version), SOMA errors (bad uri)
        fix = ("check --census-uri (a local copy with the Census layout)" if uri else
               "the hosted Census needs network access: pass --census-uri PATH to a local copy")
        raise InputError(f"{spec}: cannot open {where} ({first_line(exc)}); {fix}") from None
    try:
        data = census["census_data"] if "census_data" in census else None
        if data is None or organism not in data:
            have = ", ".join(sorted(data.keys())) if data is not None else "no census_data collection"
            raise InputError(f"{spec}: {where} has no census_data/{organism} (has: {have}); "
                             "pass one of those organisms")
        exp = data[organism]
        build_date = _census_build_date(census)
    except InputError:
        census.close()
        raise
    except Exception as exc:  # see above
        census.close()
        raise InputError(f"{spec}: cannot read {where} ({first_line(exc)}); it does not have the Census "
                         "layout (census_data/<organism> Experiments)") from None
    if uri and version and version not in ("stable", "latest") and build_date and build_date != version:
        census.close()
        raise InputError(f"{spec}: --census-version {version} was asked for but the store at {uri} is the "
                         f"{build_date} build; point --census-uri at the {version} copy or drop "
                         "--census-version")
    return CensusSource(spec, census, exp, organism=organism, uri=uri, version=version,
                        build_date=build_date, value_filter=value_filter)


def _census_build_date(census: Any) -> str | None:
    """The ``census_build_date`` row of ``census_info/summary``, when the store has one."""
    if "census_info" not in census or "summary" not in census["census_info"]:
        return None
    summary = census["census_info"]["summary"].read().concat().to_pandas()
    if not {"label", "value"} <= set(summary.columns):
        return None
    hit = summary.loc[summary["label"] == "census_build_date", "value"]
    return str(hit.iloc[0]) if len(hit) else None


def _child(spec: str, collection: Any, key: str, what: str, option: str) -> Any:
    if key not in collection:
        have = ", ".join(sorted(collection.keys())) or "none"
        raise InputError(f"{spec}: no {what} {key!r} (has: {have}); pass {option}NAME with one of those")
    return collection[key]
