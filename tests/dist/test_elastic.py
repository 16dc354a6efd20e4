"""A job resubmitted on another number of ranks continues: ZeRO-2 at world size 2, resumed at 1 and at 3."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.dist.test_pretrain_dist import base, metrics, torchrun

pytestmark = pytest.mark.dist
CFG = "configs/pretrain/demo_mae.yaml"
STEPS, BATCH, STOP = 20, 100, 12


def traced_cells(run_dir: Path) -> dict[int, list[int]]:
    """{step: cell ids of every rank} as the newest attempt that reached each step read them."""
    best: dict[int, tuple[int, list[int]]] = {}
    for f in sorted((run_dir / "cells").glob("rank-*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            start, ids = best.get(r["step"], (-1, []))
            if r["start"] > start:
                best[r["step"]] = (r["start"], [])
            if r["start"] >= start:
                best[r["step"]][1].extend(r["cell_ids"] if r["epoch"] == 0 else [])
    return {s: ids for s, (_, ids) in sorted(best.items())}


def test_zero2_checkpoint_of_two_ranks_resumes_on_one_and_on_three(tmp_path, small_corpus):
    args = lambda name, *x: base(tmp_path, small_corpus, name, STEPS,  # noqa: E731
                                 [f"data.batch_size={BATCH}", "tracking.trace_cells=true",
                                  "tracking.system_metrics=false", *x])
    runs = tmp_path / "runs"
    torchrun(CFG, args("w2", f"stop_at_step={STOP}"))
    for name in ("w1", "w3"):
        shutil.copytree(runs / "w2", runs / name)
    torchrun(CFG, args("w2"))  # same world size: the uninterrupted run (resume there is exact, tested elsewhere)
    ref = {r["step"]: r for r in metrics(runs / "w2")}
    n_cells = json.loads((small_corpus / "manifest.json").read_text())["n_cells"]

    for name, world in (("w1", 1), ("w3", 3)):
        p = torchrun(CFG, args(name), nproc=world)
        out = p.stdout + p.stderr
        assert f"saved at world size 2, resuming at {world}" in out and f"resumed at step {STOP}" in out
        rows = {r["step"]: r for r in metrics(runs / name)}
        assert sorted(rows) == list(range(1, STEPS + 1))
        # optimizer step count and schedule carried over exactly
        assert [rows[s]["lr"] for s in rows] == [ref[s]["lr"] for s in rows]
        assert rows[STOP + 1]["cells_seen"] == STOP * BATCH * 2 + BATCH * world
        # weights and Adam moments carried over: the loss goes on from where it was (about 1.6 here), not from
        # scratch (1.9 at step 1)
        mean = lambda rs, a, b: sum(rs[s]["loss"] for s in range(a, b + 1)) / (b - a + 1)  # noqa: E731
        after, ref_after = mean(rows, STOP + 1, STOP + 3), mean(ref, STOP + 1, STOP + 3)
        assert abs(after - ref_after) < 0.06 * ref_after and after < 0.9 * rows[1]["loss"], (name, after, ref_after)
        tail, ref_tail = mean(rows, STEPS - 4, STEPS), mean(ref, STEPS - 4, STEPS)
        assert abs(tail - ref_tail) < 0.06 * ref_tail, (name, tail, ref_tail)
        # the epoch in progress goes on: every cell of epoch 0 read once, but for the tail policy's few
        cells = [c for ids in traced_cells(runs / name).values() for c in ids]
        assert len(cells) == len(set(cells)), f"{name}: a cell was read twice in epoch 0"
        assert n_cells - len(cells) < world, f"{name}: {n_cells - len(cells)} cells of epoch 0 never read"
    ckpts = sorted(p.name for p in (runs / "w3" / "checkpoints").glob("step-*"))
    assert ckpts[-1] == f"step-{STEPS:08d}"  # and it saves at its own world size
