"""The SOMA backend of the loader: cells of a TileDB-SOMA experiment (our corpus's, or any other with
the Census layout) read a window at a time, with the interface of ``data_loader.readers``."""
from __future__ import annotations

import threading

import numpy as np

from scpretrain.data_loader.readers import Block, scatter_rows, window_layout


class SomaReader:
    """Reads cells of a TileDB-SOMA experiment by local row (0..n-1 over the selected cells).

    ``uri`` is the experiment; ``census_organism`` switches to a Census-layout collection
    (``census_data/<organism>``) opened through ``cellxgene_census.open_soma(uri=...)``.
    """

    def __init__(self, uri: str, obs_columns: list[str], value_filter: str | None = None,
                 measurement: str = "RNA", layer: str = "raw", census_organism: str | None = None,
                 id_column: str = "cell_id", shard_sizes: list[int] | None = None):
        self.uri, self.value_filter = str(uri), value_filter
        self.measurement, self.layer, self.organism = measurement, layer, census_organism
        self.obs_columns, self.id_column = list(obs_columns), id_column
        self._local = threading.local()  # one open experiment per thread: two windows may be read at once
        exp = self._experiment()
        names = set(exp.obs.schema.names)
        if self.id_column and self.id_column not in names:
            self.id_column = None  # a store without our cell_id (the Census): soma_joinid names the cell
        missing = [c for c in self.obs_columns if c not in names]
        if missing:
            raise KeyError(f"{self.uri}: obs has no column(s) {missing}; it has {sorted(names)}")
        if value_filter:
            tbl = exp.obs.read(value_filter=value_filter, column_names=["soma_joinid"]).concat()
            self.joinids = np.sort(tbl.column("soma_joinid").to_numpy())
        else:
            self.joinids = None  # identity: no per-cell array for an unfiltered experiment
        if self.joinids is not None:
            n = len(self.joinids)
        elif shard_sizes is not None:
            n = int(sum(shard_sizes))  # our corpus: the manifest knows (obs.count costs ~9 B per cell of RSS)
        else:
            # unfiltered rows are read as soma_joinids 0..n-1; the domain is free, obs.count is not (+180 MB
            # of RSS at 20M cells, measured)
            dom = exp.obs.non_empty_domain()
            n = int(dom[0][1]) + 1 if dom and dom[0] is not None else 0
        # Blocks over SOMA rows follow the corpus's shard boundaries when given (so the Zarr and
        # SOMA backends of one corpus stream the identical sequence); else one virtual shard.
        if shard_sizes is not None and sum(shard_sizes) == n:
            self.sizes = list(shard_sizes)
        else:
            self.sizes = [n]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _experiment(self):
        loc = self._local
        if getattr(loc, "exp", None) is None:
            if self.organism:
                import cellxgene_census

                loc.ctx = cellxgene_census.open_soma(uri=self.uri)
                loc.exp = loc.ctx["census_data"][self.organism]
            else:
                import tiledbsoma

                loc.exp = tiledbsoma.Experiment.open(self.uri)
        return loc.exp

    def set_workers(self, k: int) -> None:
        """Nothing to share out: TileDB sizes its own thread pool."""

    def read(self, shard: int, start: int, stop: int) -> Block:
        n = stop - start
        return self.read_window(np.full(n, shard), np.arange(start, stop), np.arange(n))

    def read_rows(self, rows: np.ndarray) -> Block:
        """Rows (local indices, any order) -> Block in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        key = np.argsort(rows, kind="stable")
        order = np.empty(len(key), dtype=np.int64)
        order[key] = np.arange(len(key))
        return self._read_sorted(rows[key], order)

    def read_window(self, shard: np.ndarray, row: np.ndarray, order: np.ndarray) -> Block:
        """Cells ``(shard[j], row[j])``, sorted by (shard, row), returned as rows ``order``."""
        return self._read_sorted(self.offsets[np.asarray(shard)] + np.asarray(row), np.asarray(order))

    def _read_sorted(self, rows: np.ndarray, order: np.ndarray) -> Block:
        """Local rows, sorted, read with one X and one obs query; returned as rows ``order``.

        One query with every joinid of the window (TileDB merges them into ranges) costs no more than
        one range query per block and saves the per-query overhead. TileDB's unordered results (~15x
        faster than ``result_order="row-major"``) are sorted by row only when they arrive out of order;
        one numba pass then copies every row into its place in the mixed window, casting the gene
        index to the vocabulary's smallest type (uint16 up to 65,536 genes).
        """
        import pyarrow as pa

        exp = self._experiment()
        jids = self.joinids[rows] if self.joinids is not None else np.asarray(rows, dtype=np.int64)
        X = exp.ms[self.measurement].X[self.layer]
        n = len(jids)
        coords = pa.array(jids)
        tables = list(X.read(coords=(coords,)).tables()) if n else []
        tbl = pa.concat_tables(tables) if len(tables) > 1 else (tables[0] if tables else None)
        if tbl is not None and tbl.num_rows:
            dim0 = tbl.column("soma_dim_0").to_numpy()
            dim1 = tbl.column("soma_dim_1").to_numpy()
            val = tbl.column("soma_data").to_numpy()
        else:
            dim0, dim1, val = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        if len(dim0) > 1 and np.any(dim0[1:] < dim0[:-1]):
            o = np.argsort(dim0, kind="stable")
            dim0, dim1, val = dim0[o], dim1[o], val[o]
        start = np.searchsorted(dim0, jids, side="left")  # rows are sorted: n searches, not one per nnz
        length = np.searchsorted(dim0, jids, side="right") - start
        n_genes = int(X.shape[1])
        idx_dtype = np.uint16 if n_genes <= 65536 else np.int32
        pos, out_ptr = window_layout(length, order)
        out_idx = np.empty(int(out_ptr[-1]), dtype=idx_dtype)
        out_dat = np.empty(int(out_ptr[-1]), dtype=val.dtype if val.dtype.kind == "f" else np.float32)
        scatter_rows(pos, start, length, out_ptr, dim1, val, out_idx, out_dat, 0, 0, n)
        cols = [self.id_column, *self.obs_columns] if self.id_column else list(self.obs_columns)
        obs = {}
        if cols and n:
            obs_tbl = exp.obs.read(coords=(coords,), column_names=["soma_joinid", *cols]).concat()
            at = np.searchsorted(jids, obs_tbl.column("soma_joinid").to_numpy())
            for c in cols:
                arr = obs_tbl.column(c).to_numpy(zero_copy_only=False)
                col = np.empty(n, dtype=arr.dtype)
                col[at] = arr
                obs[c] = col[order]
        for c in cols:  # an empty read still carries every column
            obs.setdefault(c, np.zeros(0, dtype=object))
        cell_id = obs.pop(self.id_column).astype(np.int64) if self.id_column else jids[order].copy()
        return Block(out_ptr, out_idx, out_dat, cell_id, obs)
