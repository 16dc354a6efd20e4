"""anndata's AnnLoader over the backed h5ad (dense torch tensors out, 0 workers).

Runs in the project's venv (anndata and torch are there; nothing is installed).
``AnnLoader(adata_backed, batch_size, shuffle=True)``: a random index batch per step, read
from the backed X and densified by anndata's default converter. Labels by ``oidx`` (the
batch's row indices).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _harness import Meter, run, versions


def main(spec: dict) -> None:
    import anndata as ad
    import torch
    from anndata.experimental import AnnLoader

    torch.manual_seed(int(spec.get("seed", 0)))
    labels = np.load(spec["labels"])
    adata = ad.read_h5ad(spec["h5ad"], backed="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "AnnLoader is deprecated, use annbatch"
        loader = AnnLoader(adata, batch_size=int(spec["batch_size"]), shuffle=True)
    meter = Meter(spec)
    if spec.get("warmup", True):
        meter.warmup(loader, batches=1)
    meter.start()
    out_type = None
    for b in loader:
        x = b.X
        if out_type is None:
            out_type = type(x).__name__ + ("(dense)" if getattr(x, "layout", None) == torch.strided else "")
        if meter.add(x.shape[0], labels[np.asarray(b.oidx)]):
            break
    meter.finish(versions=versions("anndata", "torch", "h5py"), output=out_type)


if __name__ == "__main__":
    run(main)
