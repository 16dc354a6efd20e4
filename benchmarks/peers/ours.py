"""Our StreamingLoader (data_loader) over a corpus: Zarr or SOMA backend, 0..k DataLoader workers.

Spec keys: corpus, backend ("zarr" | "soma"), batch_size, num_workers, cells or batches,
labels (an .npy of cell-type codes indexed by cell_id; optional), n_types, loader_opts
(extra StreamingLoader keyword arguments, e.g. block_size / window_batches), profile
(a path: after one unprofiled epoch, cProfile the timed one into it; workers 0 only), warm_passes (whole
untimed passes over the same loader before the timed one: the steady state of a long run), mp_context ("spawn" |
"forkserver": start the DataLoader workers that way instead of the loader's default fork).
Batches are CSR dicts; cells are counted from ``cell_id`` and labelled through it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _harness import Meter, run, versions


def _with_mp_context(ctx: str) -> None:
    """Make the loader's DataLoader start its workers with ``ctx`` (an experiment; the loader forks)."""
    from scpretrain.data_loader import stream

    plain = stream.DataLoader

    def patched(*args, **kw):
        if kw.get("num_workers"):
            kw["multiprocessing_context"] = ctx
        return plain(*args, **kw)

    stream.DataLoader = patched


def main(spec: dict) -> None:
    from scpretrain.data_loader import StreamingLoader

    if spec.get("mp_context"):
        _with_mp_context(spec["mp_context"])

    labels = np.load(spec["labels"]) if spec.get("labels") else None
    meter = Meter(spec)
    opts = dict(spec.get("loader_opts") or {})
    if spec.get("warmup", True):  # imports, JIT compiles, first opens: paid once per process, not timed
        warm = StreamingLoader(spec["corpus"], backend=spec["backend"], batch_size=int(spec["batch_size"]),
                               seed=int(spec.get("seed", 0)) + 1, rank=0, world_size=1, num_workers=0,
                               pin_memory=False, **{**opts, "read_ahead": 0})
        meter.warmup(warm, batches=2)
        del warm
    loader = StreamingLoader(spec["corpus"], backend=spec["backend"], batch_size=int(spec["batch_size"]),
                             seed=int(spec.get("seed", 0)), rank=0, world_size=1,
                             num_workers=int(spec["num_workers"]), pin_memory=False,
                             **opts)
    for _ in range(int(spec.get("warm_passes", 0))):  # steady state: whole untimed epochs first
        for batch in loader:  # (to the end: an epoch left early would be resumed, not restarted)
            pass
    prof = None
    if spec.get("profile"):
        import cProfile

        for _ in loader:  # one unprofiled epoch first: imports, JIT compiles and open files are not the loop
            pass
        prof = cProfile.Profile()
        prof.enable()
    meter.start()
    for batch in loader:
        ids = batch["cell_id"].numpy()
        if meter.add(len(ids), labels[ids] if labels is not None else None):
            break
    if prof is not None:
        prof.disable()
        prof.dump_stats(spec["profile"])
    meter.finish(versions=versions("torch", "zarr", "numcodecs", "tiledbsoma"),
                 corpus_cells=loader.n_cells,
                 loader_opts={"block_size": loader.block_size, "window_batches": loader.window_batches,
                              "read_ahead": loader.read_ahead})


if __name__ == "__main__":
    run(main)
