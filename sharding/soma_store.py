"""The SOMA side of a corpus: one TileDB-SOMA Experiment written from Arrow tables.

``tiledbsoma.io.from_anndata`` ingests about 1k cells/s; writing Arrow tables per
shard straight into obs and ms["RNA"].X["raw"] is limited by TileDB itself. Rows
are written in the corpus's shuffled order: soma_joinid = global position.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma as soma

MEASUREMENT = "RNA"
LAYER = "raw"
# X's tile extent along cells, fixed at creation. Along genes one tile spans the whole vocabulary,
# so TileDB's global order is CSR order: a range of cells is one contiguous run of every data tile
# it touches (with 2,048-gene tiles a 256-cell read decoded ~4x the cells it returned: 3.4x slower
# block reads, BENCHMARKS.md), and write_rows hands TileDB its cells already in global order.
X_ROW_TILE = 2048
# TileDB's write-time checks of coordinates (duplicates, out of the domain, global order) cost ~1 s per 15k
# cells written (1.37 s instead of 2.5 s for a 22M-non-zero shard, BENCHMARKS.md); write_rows builds its
# coordinates so that each holds by construction (canonical CSR rows, offset + row < n_cells), so they are off.
# No malloc_trim after each write: the next shard's write would fault the same pages in again.
_WRITE_CONFIG = {"sm.check_coord_dups": "false", "sm.check_coord_oob": "false", "sm.check_global_order": "false",
                 "sm.mem.malloc_trim": "false"}


def _obs_schema(columns: list[str]) -> pa.Schema:
    fields = [pa.field("soma_joinid", pa.int64())]
    for col in columns:
        fields.append(pa.field(col, pa.int64() if col == "cell_id" else pa.large_string()))
    return pa.schema(fields)


def create_experiment(uri: Path, *, n_cells: int, genes: list[tuple[str, str]],
                      obs_columns: list[str]) -> None:
    """Create the Experiment with obs (empty), var (filled) and an empty X["raw"] of shape (N, G)."""
    with soma.Experiment.create(str(uri)) as exp:
        exp.add_new_dataframe("obs", schema=_obs_schema(obs_columns), index_column_names=["soma_joinid"],
                              domain=[(0, max(n_cells, 1) - 1)])
        rna = exp.add_new_collection("ms").add_new_collection(MEASUREMENT, soma.Measurement)
        var_schema = pa.schema([("soma_joinid", pa.int64()), ("gene_id", pa.large_string()),
                                ("symbol", pa.large_string())])
        var = rna.add_new_dataframe("var", schema=var_schema, index_column_names=["soma_joinid"],
                                    domain=[(0, len(genes) - 1)])
        var.write(pa.table({"soma_joinid": np.arange(len(genes), dtype=np.int64),
                            "gene_id": pa.array([g for g, _ in genes], pa.large_string()),
                            "symbol": pa.array([s for _, s in genes], pa.large_string())}))
        tiles = {"soma_dim_0": {"tile": X_ROW_TILE}, "soma_dim_1": {"tile": max(1, len(genes))}}
        rna.add_new_collection("X").add_new_sparse_ndarray(
            LAYER, type=pa.float32(), shape=(n_cells, len(genes)),
            platform_config={"tiledb": {"create": {"dims": tiles}}})


def write_rows(uri: Path, offset: int, csr: sp.csr_matrix, obs: pd.DataFrame, *, replace: bool) -> None:
    """Write rows [offset, offset + n) of obs and X.

    ``replace`` first deletes whatever a crashed earlier run may have left in those
    rows, so a resumed build never leaves duplicate or stale cells behind.
    """
    n = csr.shape[0]
    if n == 0:
        return
    rows = slice(offset, offset + n - 1)  # SOMA slices are inclusive
    x_uri = f"{uri}/ms/{MEASUREMENT}/X/{LAYER}"
    if replace:
        with soma.DataFrame.open(f"{uri}/obs", "d") as df:
            df.delete_cells((rows,))
        with soma.SparseNDArray.open(x_uri, "d") as arr:
            arr.delete_cells((rows,))
    table = {"soma_joinid": np.arange(offset, offset + n, dtype=np.int64)}
    for col in obs.columns:
        values = obs[col].to_numpy()
        table[col] = values.astype(np.int64) if col == "cell_id" else pa.array(values.astype(str),
                                                                                 pa.large_string())
    with soma.DataFrame.open(f"{uri}/obs", "w") as df:
        df.write(pa.table(table))
    ctx = soma.SOMATileDBContext(tiledb_config=_WRITE_CONFIG)
    with soma.SparseNDArray.open(x_uri, "w", context=ctx) as arr:
        n_rows, n_cols = arr.shape
        if offset + n > n_rows or csr.shape[1] > n_cols:
            raise ValueError(f"{x_uri}: rows {offset}-{offset + n - 1} x {csr.shape[1]} genes are outside X's "
                             f"shape {(n_rows, n_cols)}")
        arr.write(x_table(csr, offset),
                  platform_config={"tiledb": {"write": {"sort_coords": False}}})


def x_table(csr: sp.csr_matrix, offset: int) -> pa.Table:
    """X's coordinates and values for rows [offset, offset + n), in TileDB's global order for these tiles (CSR
    order, sorted columns, no duplicates: the checks-off write needs exactly that, so no sort either). One Arrow
    batch per row tile: TileDB takes them in turn into one fragment, and the int64 coordinate arrays stay small
    enough to reuse memory instead of faulting in fresh pages (1.15 s vs 1.41 s a shard)."""
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    return pa.Table.from_batches(list(_x_batches(csr, offset)), schema=_X_SCHEMA)


_X_SCHEMA = pa.schema([("soma_dim_0", pa.int64()), ("soma_dim_1", pa.int64()), ("soma_data", pa.float32())])


def _x_batches(csr: sp.csr_matrix, offset: int) -> Iterator[pa.RecordBatch]:
    ptr = csr.indptr
    for lo in range(0, csr.shape[0], X_ROW_TILE):
        hi = min(lo + X_ROW_TILE, csr.shape[0])
        a, b = ptr[lo], ptr[hi]
        rows = np.repeat(np.arange(offset + lo, offset + hi, dtype=np.int64), np.diff(ptr[lo:hi + 1]))
        yield pa.RecordBatch.from_arrays([pa.array(rows), pa.array(csr.indices[a:b].astype(np.int64)),
                                          pa.array(csr.data[a:b].astype(np.float32))],
                                         names=["soma_dim_0", "soma_dim_1", "soma_data"])


def check_experiment(uri: Path, *, n_cells: int, n_genes: int, nnz: int) -> list[str]:
    """Problems with the SOMA experiment against the manifest. Empty = fine."""
    problems: list[str] = []
    try:
        with soma.Experiment.open(str(uri)) as exp:
            n_obs = exp.obs.count
            rna = exp.ms[MEASUREMENT]
            n_var = rna.var.count
            arr = rna.X[LAYER]
            shape, stored = tuple(arr.shape), arr.nnz
    except Exception as exc:  # tiledbsoma raises several types for a damaged array
        return [f"cannot open the experiment ({type(exc).__name__}: {exc})"]
    if n_obs != n_cells:
        problems.append(f"obs has {n_obs} rows, manifest says {n_cells}")
    if n_var != n_genes:
        problems.append(f"var has {n_var} genes, manifest says {n_genes}")
    if shape != (n_cells, n_genes):
        problems.append(f"X['{LAYER}'] shape is {shape}, manifest says {(n_cells, n_genes)}")
    if stored != nnz:
        problems.append(f"X['{LAYER}'] has {stored} non-zeros, manifest says {nnz}")
    return problems
