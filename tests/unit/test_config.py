"""The typed config tree: unknown keys and wrong types name the key; every shipped config builds."""
import re
from pathlib import Path

import pytest

from scpretrain.scmodels.build import build_model
from scpretrain.train.config import ConfigError, load_config, resolve_model_params
from scpretrain.train.engine import deepspeed_config

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))


def test_unknown_key_names_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.1\n  learning_rate: 0.2\n")
    with pytest.raises(ConfigError, match=r"^optim\.learning_rate: unknown key"):
        load_config(f)


def test_wrong_type_names_it():
    with pytest.raises(ConfigError, match=r"^data\.batch_size: expected int, got str"):
        load_config(None, ["data.batch_size=big"])
    with pytest.raises(ConfigError, match=r"^engine\.zero_stage: expected int, got bool"):
        load_config(None, ["engine.zero_stage=true"])


def test_overrides_and_corpus_shortcut():
    cfg = load_config(REPO / "configs/pretrain/demo_mae.yaml", ["corpus=/x", "optim.lr=3e-4", "engine.zero_stage=3"])
    assert cfg.data.corpus == "/x" and cfg.optim.lr == 3e-4 and cfg.engine.zero_stage == 3


def test_mix_override_parses_into_entries():
    cfg = load_config(REPO / "configs/pretrain/demo_mae.yaml",
                      ["corpus=/a", "data.weight=3", "data.mix=[{corpus: /b, weight: 1}, {corpus: /c}]"])
    assert [(m.corpus, m.weight) for m in cfg.data.mix] == [("/b", 1.0), ("/c", 1.0)] and cfg.data.weight == 3.0
    with pytest.raises(ConfigError, match=r"data.mix\[0\].*unknown key"):
        load_config(None, ["data.mix=[{corpus: /b, wieght: 1}]"])


@pytest.mark.parametrize("path", PRETRAIN, ids=[p.stem for p in PRETRAIN])
def test_every_pretrain_config_builds(path):
    cfg = load_config(path)
    params = {**resolve_model_params(cfg.model), "n_genes": 50}
    model = build_model(cfg.model.family, params)
    assert sum(p.numel() for p in model.parameters()) > 0
    ds = deepspeed_config(cfg, world_size=2, device_type="cpu")
    assert ds["train_batch_size"] == cfg.data.batch_size * cfg.engine.grad_accum * 2
    assert ds["zero_optimization"]["stage"] == cfg.engine.zero_stage
    assert ds["bf16"]["enabled"] is False  # fp32 on CPU


def test_preset_family_mismatch():
    with pytest.raises(ConfigError, match="model.preset"):
        resolve_model_params(load_config(None, ["model.family=performer", "model.preset=mae_tiny"]).model)


@pytest.mark.parametrize("override, words", [
    ("checkpoint.keep=0", "checkpoint.keep: 0 would delete every checkpoint"),
    ("checkpoint.keep=-1", "checkpoint.keep: -1"),
    ("checkpoint.resume=bogus", "checkpoint.resume: 'bogus' is not 'auto'"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps: 0; set 1 or more"),
    ("checkpoint.every_minutes=0", "checkpoint.every_minutes: 0.0; set a positive number"),
    ("checkpoint.save_on_signal=[SIGTERM, SIGFOO]", "checkpoint.save_on_signal: 'SIGFOO' is not a signal name"),
    ("max_steps=0", "max_steps: 0"),
])
def test_values_that_cannot_work_are_refused_with_the_key(override, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(REPO / "configs/pretrain/demo_mae.yaml", [override])


def test_an_export_dir_holding_other_files_is_refused_before_training(tmp_path):
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "paper.tex").write_text("keep")
    with pytest.raises(ConfigError, match=re.escape(f"export_dir: {mine} exists and is not an export")):
        load_config(REPO / "configs/pretrain/demo_mae.yaml", [f"export_dir={mine}"])
    load_config(REPO / "configs/pretrain/demo_mae.yaml", [f"export_dir={tmp_path / 'new'}"])  # a new folder is fine
