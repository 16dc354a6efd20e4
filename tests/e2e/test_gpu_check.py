"""The prepared device check runs whole here on the CPU (tiny presets), so it is ready when a GPU is lent."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def test_gpu_check_cpu_dry_run_writes_every_stage(tmp_path):
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    read = lambda name: json.loads((tmp_path / name).read_text())  # noqa: E731
    assert read("stage0_env.json")["deepspeed"][0].isdigit()
    assert read("stage1_peak.json")["tflops"] > 0
    model = read("stage2_model.json")
    assert set(model) == {"mae_tiny", "scbert_tiny"} and all(r["cells_per_s"] > 0 for r in model.values())
    assert set(read("stage3_loader.json")) == {"0", "1"}
    e2e = read("stage4_e2e.json")
    for preset in ("mae_tiny", "scbert_tiny"):
        r = e2e[preset]
        assert "error" not in r, r
        assert r["cells_per_s_per_gpu"] > 0 and r["epochs"] == [0] and 0 <= r["data_stall"] <= 1
