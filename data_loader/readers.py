"""Block readers: rows of a corpus -> CSR counts + global cell ids + requested obs columns.

Two backends behind one interface (``Reader.read(shard, rows)``):
* ``ZarrReader``: the corpus's AnnData Zarr shards, read array by array with zarr (the
  AnnData object layer is skipped: it is the slow part).
* ``SomaReader``: a TileDB-SOMA experiment -- the corpus's own, or any experiment with the
  Census layout (measurement ``RNA``, X layer ``raw``) with an optional obs value filter.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Block:
    """CSR rows plus their global identity. ``obs`` maps column -> numpy array (object for text)."""

    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int32 [nnz]
    data: np.ndarray  # float32 [nnz]
    cell_id: np.ndarray  # int64 [n]
    obs: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.cell_id)


def concat_blocks(blocks: list[Block]) -> Block:
    offs = np.cumsum([0] + [b.indptr[-1] for b in blocks])
    indptr = np.concatenate([[0]] + [b.indptr[1:] - b.indptr[0] + o for b, o in zip(blocks, offs[:-1])])
    return Block(
        indptr.astype(np.int64),
        np.concatenate([b.indices for b in blocks]).astype(np.int32, copy=False),
        np.concatenate([b.data for b in blocks]).astype(np.float32, copy=False),
        np.concatenate([b.cell_id for b in blocks]),
        {k: np.concatenate([b.obs[k] for b in blocks]) for k in (blocks[0].obs if blocks else {})},
    )


def take_rows(block: Block, order: np.ndarray) -> Block:
    """Rows of ``block`` in ``order`` (a permutation or subset), vectorised."""
    starts, stops = block.indptr[order], block.indptr[order + 1]
    lens = stops - starts
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    # gather index: for each output nnz, its source position
    src = np.repeat(starts - indptr[:-1], lens) + np.arange(indptr[-1], dtype=np.int64)
    return Block(indptr, block.indices[src], block.data[src], block.cell_id[order],
                 {k: v[order] for k, v in block.obs.items()})


class ZarrReader:
    """Reads row ranges of the corpus's Zarr shards. Opens arrays lazily (safe to pickle into workers)."""

    def __init__(self, corpus: str | Path, manifest: dict, obs_columns: list[str]):
        self.root = Path(corpus)
        self.paths = [self.root / s["path"] for s in manifest["zarr"]["shards"]]
        self.sizes = [int(s["n_cells"]) for s in manifest["zarr"]["shards"]]
        self.obs_columns = list(obs_columns)
        self._open: dict[int, dict] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def _arrays(self, shard: int) -> dict:
        if shard not in self._open:
            import zarr

            g = zarr.open_group(str(self.paths[shard]), mode="r")
            arrs = {"indptr": g["X/indptr"], "indices": g["X/indices"], "data": g["X/data"],
                    "cell_id": g["obs/cell_id"]}
            for col in self.obs_columns:
                node = g[f"obs/{col}"]
                if isinstance(node, zarr.Group):  # AnnData categorical: codes + categories
                    arrs[col] = (node["codes"], np.asarray(node["categories"][:], dtype=object))
                else:
                    arrs[col] = node
            self._open[shard] = arrs
        return self._open[shard]

    def read(self, shard: int, start: int, stop: int) -> Block:
        a = self._arrays(shard)
        ptr = np.asarray(a["indptr"][start: stop + 1], dtype=np.int64)
        lo, hi = int(ptr[0]), int(ptr[-1])
        obs = {}
        for col in self.obs_columns:
            node = a[col]
            if isinstance(node, tuple):
                codes = np.asarray(node[0][start:stop])
                obs[col] = np.where(codes >= 0, node[1][np.maximum(codes, 0)], None)
            else:
                obs[col] = np.asarray(node[start:stop])
        return Block(ptr - lo, np.asarray(a["indices"][lo:hi], dtype=np.int32),
                     np.asarray(a["data"][lo:hi], dtype=np.float32),
                     np.asarray(a["cell_id"][start:stop], dtype=np.int64), obs)


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
        self._exp = None
        self._ctx = None
        exp = self._experiment()
        if value_filter:
            tbl = exp.obs.read(value_filter=value_filter, column_names=["soma_joinid"]).concat()
            self.joinids = np.sort(tbl.column("soma_joinid").to_numpy())
        else:
            n = exp.obs.count
            self.joinids = np.arange(n, dtype=np.int64)
        # Blocks over SOMA rows follow the corpus's shard boundaries when given (so the Zarr and
        # SOMA backends of one corpus stream the identical sequence); else one virtual shard.
        if shard_sizes is not None and sum(shard_sizes) == len(self.joinids):
            self.sizes = list(shard_sizes)
        else:
            self.sizes = [len(self.joinids)]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_exp": None, "_ctx": None}

    def _experiment(self):
        if self._exp is None:
            if self.organism:
                import cellxgene_census

                self._ctx = cellxgene_census.open_soma(uri=self.uri)
                self._exp = self._ctx["census_data"][self.organism]
            else:
                import tiledbsoma

                self._exp = tiledbsoma.Experiment.open(self.uri)
        return self._exp

    def read(self, shard: int, start: int, stop: int) -> Block:
        return self.read_rows(self.offsets[shard] + np.arange(start, stop))

    def read_rows(self, rows: np.ndarray) -> Block:
        """Rows (local indices, any order) -> Block in that order."""
        import pyarrow as pa

        exp = self._experiment()
        jids = self.joinids[rows]
        order = np.argsort(jids, kind="stable")
        sorted_j = jids[order]
        X = exp.ms[self.measurement].X[self.layer]
        tbl = pa.concat_tables(X.read(coords=(pa.array(sorted_j),)).tables())
        dim0 = tbl.column("soma_dim_0").to_numpy()
        dim1 = tbl.column("soma_dim_1").to_numpy()
        val = tbl.column("soma_data").to_numpy()
        # SOMA returns COO in no promised order: sort by (row in sorted_j, column)
        r = np.searchsorted(sorted_j, dim0)
        o = np.lexsort((dim1, r))
        r, dim1, val = r[o], dim1[o], val[o]
        indptr = np.zeros(len(sorted_j) + 1, dtype=np.int64)
        np.add.at(indptr, r + 1, 1)
        indptr = np.cumsum(indptr)
        cols = [self.id_column, *self.obs_columns] if self.id_column else list(self.obs_columns)
        obs_tbl = exp.obs.read(coords=(pa.array(sorted_j),), column_names=["soma_joinid", *cols]).concat()
        pos = np.searchsorted(sorted_j, obs_tbl.column("soma_joinid").to_numpy())
        obs = {}
        for c in cols:
            arr = obs_tbl.column(c).to_numpy(zero_copy_only=False)
            out = np.empty(len(sorted_j), dtype=arr.dtype)
            out[pos] = arr
            obs[c] = out
        cell_id = obs.pop(self.id_column).astype(np.int64) if self.id_column else sorted_j.copy()
        blk = Block(indptr, dim1.astype(np.int32), val.astype(np.float32), cell_id, obs)
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        return take_rows(blk, inv)
