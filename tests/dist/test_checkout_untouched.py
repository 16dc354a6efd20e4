"""The suite's training configs, run from the checkout, write nothing into it (issue 12: `make test` once
overwrote the demo's exports). Every file under the checkout, ignored ones included, is compared before and
after; the export lands in the run's own directory."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.dist.test_pretrain_dist import torchrun

pytestmark = pytest.mark.dist
SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP and not d.endswith(".egg-info")]
        for f in filenames:
            p = Path(dirpath) / f
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("config, extra", [
    ("configs/pretrain/demo_mae.yaml", ["data.batch_size=32"]),
    ("configs/pretrain/demo_performer.yaml", ["data.batch_size=4", "model.params.dim=16", "model.params.depth=1",
                                              "model.params.heads=2"]),
])
def test_training_configs_write_nothing_into_the_checkout(tmp_path, small_corpus, config, extra):
    before = snapshot(REPO)
    torchrun(config, [f"corpus={small_corpus}", f"out_dir={tmp_path / 'runs'}", "name=clean", "max_steps=2",
                      "tracking.progress=false", "checkpoint.every_steps=1", *extra], nproc=1)
    after = snapshot(REPO)
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert not changed and before.keys() == after.keys(), (
        f"new: {sorted(after.keys() - before.keys())[:10]}, removed: {sorted(before.keys() - after.keys())[:10]}, "
        f"changed: {changed[:10]}")
    cfg = json.loads((tmp_path / "runs" / "clean" / "export" / "config.json").read_text())
    assert cfg["provenance"]["run"] == "clean" and cfg["provenance"]["steps"] == 2
