"""What every loader run shares: the spec it is given, the meter it reports through.

Standalone (stdlib + numpy only): the runners execute under three interpreters (the
project's venv, ``venv-peers`` on 3.11 and ``venv-annbatch`` on 3.12), so nothing here
imports the project.

A run is ``python <runner>.py SPEC.json``. The spec names the store, batch size, how many
cells to read and where to write the result JSON. The runner first takes a batch or two from a
throw-away instance (``meter.warmup``: imports, JIT compiles and first opens are paid once per
process, as in a long training run), builds its loader, calls ``meter.start()`` right before
asking for the first batch, ``meter.add(n, labels)`` per
batch (True = enough cells read) and ``meter.finish()`` at the end.

Reported: cells read, seconds from ``start()`` to the last batch (so a DataLoader's
worker start-up and the first fetch are included), time to the first batch, per-batch
label histograms (the parent computes shuffle quality from them), and this process's
and its children's peak RSS (``getrusage``: the kernel's high-water marks).
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np


def load_spec() -> dict:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} SPEC.json")
    return json.loads(Path(sys.argv[1]).read_text())


def versions(*names: str) -> dict:
    out = {"python": sys.version.split()[0]}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def maxrss_mb() -> tuple[float, float]:
    """Peak RSS of this process and of its largest waited-for child, in MB (Linux: ru_maxrss is KiB)."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return me, kids


class Meter:
    def __init__(self, spec: dict, n_types: int = 0):
        self.spec = spec
        self.target = int(spec.get("cells") or 0)  # 0: read until the loader ends
        self.max_batches = int(spec.get("batches") or 0)  # >0: read exactly this many batches
        self.n_types = int(n_types or spec.get("n_types") or 0)
        self.cells = 0
        self.batches = 0
        self.hist: list[list[int]] = []
        self.sizes: list[int] = []
        self.t0 = self.t_first = self.t_last = None
        self.extra: dict = {}
        self._progress = str(spec["result"]) + ".progress" if spec.get("result") else None
        self._last_tick = 0.0

    def _tick(self, force: bool = True) -> None:
        """Tell the parent's stall watchdog that the run is alive (it reads this file's mtime).
        From ``add`` at most once a second, so the timed loop does not pay for file writes."""
        now = time.monotonic()
        if self._progress and (force or now - self._last_tick >= 1.0):
            self._last_tick = now
            with open(self._progress, "w") as f:
                f.write(str(self.cells))

    def warmup(self, iterable, batches: int = 1) -> None:
        """Take ``batches`` batches from a throw-away loader before timing: what a process pays once
        (imports, JIT compiles, opening the store) is then not part of the timed pass."""
        self._tick()
        t0 = time.perf_counter()
        it = iter(iterable)
        for _ in range(batches):
            if next(it, None) is None:
                break
        self.extra["warmup_s"] = time.perf_counter() - t0
        close = getattr(it, "close", None)
        if close is not None:
            close()
        del it

    def start(self) -> None:
        self._tick()
        self.t0 = time.perf_counter()

    def add(self, n: int, labels: np.ndarray | None = None) -> bool:
        """Count one batch of ``n`` cells; ``labels``: their cell-type codes. True once enough is read."""
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.cells += int(n)
        self.batches += 1
        self.sizes.append(int(n))
        self._tick(force=False)
        if labels is not None and self.n_types:
            lab = np.asarray(labels).astype(np.int64, copy=False)
            self.hist.append(np.bincount(lab[lab >= 0], minlength=self.n_types).tolist())
        if self.max_batches:
            return self.batches >= self.max_batches
        return bool(self.target) and self.cells >= self.target

    def finish(self, **extra) -> None:
        me, kids = maxrss_mb()
        t0 = self.t0 if self.t0 is not None else self.t_first
        secs = (self.t_last - t0) if (self.t_last is not None and t0 is not None) else float("nan")
        res = {
            "status": "ok" if self.cells else "failed: no cells read",
            "cells": self.cells, "batches": self.batches, "seconds": secs,
            "cells_per_s": self.cells / secs if secs and secs > 0 else None,
            "first_batch_s": (self.t_first - t0) if self.t_first is not None and t0 is not None else None,
            "batch_sizes": self.sizes, "label_hist": self.hist,
            "maxrss_self_mb": me, "maxrss_children_mb": kids, **self.extra, **extra,
        }
        Path(self.spec["result"]).write_text(json.dumps(res))


def run(main) -> None:
    """Run ``main(spec)``; any exception becomes a 'failed: ...' result (the parent shows it)."""
    spec = load_spec()
    try:
        main(spec)
    except BaseException as e:
        tb = traceback.format_exc()
        Path(spec["result"]).write_text(json.dumps({
            "status": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
            "traceback": tb[-4000:]}))
        raise
