"""A Zarr-only build and a Zarr-only run without MLflow import neither mlflow nor tiledbsoma (nor the Census
client): a GPU box or a user's environment needs neither installed for them. A build does not import torch
either (~1 s of every build process's start, issue 17)."""
from __future__ import annotations

import json

from tests.conftest import run_cli

SCRIPT = """
import json, sys
from scpretrain.train.__main__ import main
rc = main(sys.argv[1:])
print("MODULES", json.dumps(sorted({k.split('.')[0] for k, v in list(sys.modules.items()) if v is not None} & {"mlflow", "tiledbsoma", "cellxgene_census"})), rc)
"""


BUILD = """
import json, sys
from scpretrain.sharding.__main__ import main
rc = main(sys.argv[1:])
print("MODULES", json.dumps(sorted({k.split('.')[0] for k, v in list(sys.modules.items()) if v is not None} & {"mlflow", "tiledbsoma", "cellxgene_census", "torch"})), rc)
"""


def test_zarr_build_and_run_without_tracking_import_no_mlflow_and_no_tiledbsoma(tmp_path):
    corpus = tmp_path / "corpus"
    p = run_cli(["-c", BUILD, "build", "--source", "synthetic://cells=600,genes=120,types=3,datasets=2,seed=0",
                 "--out", str(corpus), "--format", "zarr"], timeout=300)
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("MODULES"))
    assert json.loads(line.split(" ", 2)[1]) == [] and line.endswith(" 0")
    p = run_cli(["-c", SCRIPT, "pretrain", "--config", "configs/pretrain/demo_mae.yaml", f"corpus={corpus}",
                 f"out_dir={tmp_path}", "name=light", "max_steps=2", "data.batch_size=16", "tracking.mlflow=false",
                 "tracking.progress=false", "tracking.log_every=1", "data.backend=zarr"], timeout=300)
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("MODULES"))
    assert json.loads(line.split(" ", 2)[1]) == [] and line.endswith(" 0")
    assert [json.loads(x)["step"] for x in (tmp_path / "light" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (tmp_path / "light" / "export" / "model.safetensors").is_file()


def test_scmodels_preprocess_is_the_function_after_its_submodule_is_imported():
    p = run_cli(["-c", "import sys, types\n"
                 "import scpretrain.scmodels.genes\n"
                 "assert 'torch' not in sys.modules\n"
                 "from scpretrain.scmodels.preprocess import PreprocessSpec\n"
                 "import scpretrain.scmodels as m\n"
                 "from scpretrain.scmodels import preprocess, build_model\n"
                 "assert preprocess is m.preprocess and not isinstance(preprocess, types.ModuleType)\n"
                 "assert callable(build_model) and 'FAMILIES' in dir(m)\n"
                 "print('OK')"], timeout=120)
    assert p.stdout.strip().endswith("OK")
