"""scDataset over the backed h5ad (CSR out), in this process (0 workers). Runs in ``venv-peers``.

``scDataset(X, BlockShuffling(block_size), batch_size, fetch_factor, seed)`` where X is the
backed h5ad's sparse dataset (anndata ``CSRDataset``): each fetch reads ``batch_size *
fetch_factor`` sorted rows, then batches are cut from a shuffle of the fetch. A fetch
callback also carries the row indices along, to label the batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _harness import Meter, run, versions


def main(spec: dict) -> None:
    import anndata as ad
    from scdataset import BlockShuffling, scDataset

    class Rows:
        """The backed X as scDataset's indexable collection (len + fancy row indexing -> scipy CSR)."""

        def __init__(self, x):
            self.x = x

        def __len__(self) -> int:
            return self.x.shape[0]

        def __getitem__(self, idx):
            return self.x[idx]

    labels = np.load(spec["labels"])
    adata = ad.read_h5ad(spec["h5ad"], backed="r")
    ds = scDataset(Rows(adata.X), BlockShuffling(block_size=int(spec.get("block_size", 8))),
                   batch_size=int(spec["batch_size"]), fetch_factor=int(spec.get("fetch_factor", 16)),
                   seed=int(spec.get("seed", 0)),
                   fetch_callback=lambda coll, idx: (coll[idx], np.asarray(idx)),
                   batch_callback=lambda fetched, sel: (fetched[0][sel], fetched[1][sel]))
    meter = Meter(spec)
    if spec.get("warmup", True):
        meter.warmup(ds, batches=1)  # scDataset's epoch counter moves on: the timed pass is a new epoch
    meter.start()
    out_type = None
    for x, rows in ds:
        out_type = out_type or type(x).__name__
        if meter.add(x.shape[0], labels[rows]):
            break
    meter.finish(versions=versions("scdataset", "anndata", "h5py"), output=out_type)


if __name__ == "__main__":
    run(main)
