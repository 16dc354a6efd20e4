"""The demo path end to end at a small size: corpus -> 2 x torchrun/DeepSpeed -> exports -> annotation."""
import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


def test_demo_small(tmp_path):
    out = tmp_path / "demo"
    p = run_cli(["-m", "launch.demo", "--out", str(out), "--cells", "3000", "--genes", "800",
                 "--mae-steps", "30", "--performer-steps", "10"], timeout=900)
    man = json.loads((out / "corpus" / "manifest.json").read_text())
    assert man["n_cells"] > 3000 and man["n_genes"] == 800  # 700 PBMC + synthetic
    assert man["zarr"]["shards"] and man["soma"]["n_cells"] == man["n_cells"]
    for fam in ("mae", "performer"):
        cfg = json.loads((out / "exports" / f"{fam}_demo" / "config.json").read_text())
        assert cfg["model_family"] == fam
        rows = [json.loads(x) for x in (out / "runs" / f"demo_{fam}" / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["loss"] < rows[0]["loss"]  # it learned something
        rep = json.loads((out / "annotation" / fam / "report.json").read_text())
        assert rep  # the numbers the demo printed
    mae = json.loads((out / "annotation" / "mae" / "report.json").read_text())
    m = mae["methods"]
    assert m["head"]["accuracy"] > m["majority"]["accuracy"]  # real training beats the majority rate
    assert 0 < m["logreg"]["accuracy"] <= 1
    assert "open the UI" in p.stdout and "mlflow.db" in p.stdout
