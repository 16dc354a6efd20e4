"""tiledbsoma-ml (formerly Census ExperimentDataPipe) over a TileDB-SOMA experiment (our corpus's soma/).

Runs in ``venv-peers``. ``ExperimentDataset(query, layer_name="raw", batch_size,
shuffle=True, seed)`` with the library's defaults (io_batch_size 65,536, shuffle_chunk_size
64, eager fetch), wrapped by ``experiment_dataloader(num_workers=k)``. X comes out dense
(numpy) unless the spec sets ``sparse`` (then scipy CSR). Labels: by ``soma_joinid`` from an
.npy the parent wrote from the experiment's obs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _harness import Meter, run, versions


def main(spec: dict) -> None:
    import tiledbsoma
    from tiledbsoma_ml import ExperimentDataset, experiment_dataloader

    labels = np.load(spec["labels"])
    meter = Meter(spec)
    out_type = None
    with tiledbsoma.Experiment.open(spec["soma"]) as exp, exp.axis_query(measurement_name="RNA") as query:
        ds = ExperimentDataset(query, layer_name="raw", obs_column_names=["soma_joinid"],
                               batch_size=int(spec["batch_size"]), shuffle=True,
                               seed=int(spec.get("seed", 0)), return_sparse_X=bool(spec.get("sparse")))
        if spec.get("warmup", True):
            meter.warmup(ds, batches=1)  # in this process, no workers
        k = int(spec["num_workers"])
        dl = experiment_dataloader(ds, num_workers=k, **({"persistent_workers": False} if k else {}))
        meter.start()
        for x, obs in dl:
            out_type = out_type or type(x).__name__
            jid = obs["soma_joinid"].to_numpy()
            if meter.add(x.shape[0], labels[jid]):
                break
        del dl
    meter.finish(versions=versions("tiledbsoma-ml", "tiledbsoma", "torch"), output=out_type)


if __name__ == "__main__":
    run(main)
