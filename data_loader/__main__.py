"""``python -m data_loader trace``: stream an epoch through the real loader and record, per rank
and batch, the global cell ids read -- to trace a loss spike to its cells, or audit exactly-once.

    python -m data_loader trace --corpus DIR --world-size 2 --workers 2 --batch-size 64 --seed 0 \\
        --epoch 0 --out trace.jsonl [--rank R] [--backend zarr|soma]
    # stop after N batches per rank and save the (global) stream state ...
    python -m data_loader trace ... --stop-after 10 --state-out state.json --out part1.jsonl
    # ... and continue with any world size or worker count
    python -m data_loader trace ... --world-size 3 --workers 0 --state-in state.json --out part2.jsonl

Each output line: {"rank", "batch", "epoch", "cell_ids": [...], "datasets": {dataset_id: n}}.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def trace(a: argparse.Namespace) -> dict:
    from scpretrain.data_loader.stream import StreamingLoader

    state = json.loads(Path(a.state_in).read_text()) if a.state_in else None
    ranks = [a.rank] if a.rank is not None else list(range(a.world_size))
    out = open(a.out, "w")
    seen: list[int] = []
    per_rank, last_state = {}, None
    for r in ranks:
        loader = StreamingLoader(a.corpus, backend=a.backend, batch_size=a.batch_size, seed=a.seed, rank=r,
                                 world_size=a.world_size, num_workers=a.workers, block_size=a.block_size,
                                 window_batches=a.window_batches, obs_columns=["dataset_id"])
        if state is not None:
            loader.load_state_dict(state)
        else:
            loader.set_epoch(a.epoch)
        n = 0
        for batch in loader:
            ids = batch["cell_id"].tolist()
            seen += ids
            out.write(json.dumps({"rank": r, "batch": n, "epoch": batch["epoch"], "cell_ids": ids,
                                  "datasets": dict(Counter(batch["obs"]["dataset_id"]))}) + "\n")
            n += 1
            if a.stop_after and n >= a.stop_after:
                break
        per_rank[r] = n
        last_state = loader.state_dict()
    out.close()
    if a.state_out:
        # the cursor is global: every rank consumed the same number of batches
        Path(a.state_out).write_text(json.dumps(last_state))
    summary = {"ranks": per_rank, "cells": len(seen), "unique": len(set(seen)),
               "duplicates": len(seen) - len(set(seen))}
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trace", help="record the cell ids of every batch of an epoch")
    t.add_argument("--corpus", required=True)
    t.add_argument("--backend", choices=["zarr", "soma"], default="zarr")
    t.add_argument("--world-size", type=int, default=1)
    t.add_argument("--workers", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--block-size", type=int, default=None,
                   help="rows per I/O block (default: the loader's, 1,024 on a pre-shuffled corpus)")
    t.add_argument("--window-batches", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epoch", type=int, default=0)
    t.add_argument("--rank", type=int, default=None, help="only this rank (default: all, one after another)")
    t.add_argument("--out", required=True, help="JSON lines, one per batch")
    t.add_argument("--stop-after", type=int, default=None, help="batches per rank, then stop")
    t.add_argument("--state-out", default=None, help="write the stream state here after stopping")
    t.add_argument("--state-in", default=None, help="continue from a saved stream state")
    a = p.parse_args(argv)
    if (a.state_out and not a.stop_after) or (a.stop_after and a.rank is not None and a.state_out):
        p.error("--state-out needs --stop-after and all ranks (no --rank): the state is global")
    trace(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
