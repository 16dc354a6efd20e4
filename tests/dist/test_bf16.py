"""bf16 end to end on the CPU (issue 13): DeepSpeed casts the weights to bf16, the trainer casts the inputs and
takes the outputs back to fp32; both families train under torchrun with a finite, falling loss."""
from __future__ import annotations

import math

import pytest

from tests.dist.test_pretrain_dist import base, metrics, torchrun

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("config, extra", [
    ("configs/pretrain/demo_mae.yaml", ["optim.lr=0.003"]),
    ("configs/pretrain/demo_performer.yaml", ["data.batch_size=8", "optim.lr=0.003"]),
])
def test_bf16_trains_both_families(tmp_path, small_corpus, config, extra):
    name = "bf16"
    torchrun(config, base(tmp_path, small_corpus, name, 12, ["engine.precision=bf16", "export=false",
                                                                   "checkpoint.every_steps=100", *extra]))
    losses = [r["loss"] for r in metrics(tmp_path / "runs" / name) if "loss" in r]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert '"bf16": {\n    "enabled": true' in (tmp_path / "runs" / name / "deepspeed_config.json").read_text()
