"""Preemption loses nothing (issue 20): a signal ends a run at a committed checkpoint of the step it was on,
exit 75, and the same command resumes there, continuing the data stream exactly (losses equal to an
uninterrupted run's, step for step)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.dist.test_pretrain_dist import base, metrics, torchrun

pytestmark = pytest.mark.dist
CFG = "configs/pretrain/demo_mae.yaml"
STEPS = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("ref")
    torchrun(CFG, base(tmp, small_corpus, "ref", STEPS, ["checkpoint.every_steps=100"]))
    return metrics(tmp / "runs" / "ref")


def _committed(run) -> list[int]:
    ck = run / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in ck.iterdir() if (p / "COMMITTED").exists())


def test_sigterm_to_the_launcher_checkpoints_the_step_and_resumes_exactly(tmp_path, small_corpus, reference):
    args = base(tmp_path, small_corpus, "pre", STEPS, ["checkpoint.every_steps=100"])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "SCPRETRAIN_FAULT": "slow:ms=400"}
    proc = subprocess.Popen([sys.executable, "-m", "launch", "--config", CFG, "--nproc-per-node", "2", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    run = tmp_path / "runs" / "pre"
    deadline = time.time() + 300
    while time.time() < deadline:  # mid-epoch: after step 3 is logged
        if (run / "metrics.jsonl").exists() and any(r["step"] >= 3 for r in metrics(run) if "loss" in r):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # what SLURM / a scheduler sends
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 75, out[-3000:]
    logged = max(r["step"] for r in metrics(run) if "loss" in r)
    saved = json.loads((run / "preempted.json").read_text())
    assert saved["signal"] == "SIGTERM" and _committed(run) == [saved["step"]] and saved["step"] >= logged
    assert saved["step"] < STEPS and "resume with the same command" in out
    torchrun(CFG, args)  # the same command: resumes, finishes
    rows = metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in reference if "loss" in r]


def test_sigusr1_to_one_rank_only_stops_every_rank_at_one_agreed_step(tmp_path, small_corpus, reference):
    args = base(tmp_path, small_corpus, "usr1", STEPS, ["checkpoint.every_steps=100"])
    p = torchrun(CFG, args, env={"SCPRETRAIN_FAULT": f"signal:rank=1:step=5:sig={int(signal.SIGUSR1)}"},
                 check=False)
    out = p.stdout + p.stderr
    run = tmp_path / "runs" / "usr1"
    assert "[fault] signal: SIGUSR1 to rank 1 after step 5" in out
    assert _committed(run) == [5] and json.loads((run / "preempted.json").read_text())["step"] == 5
    p2 = torchrun(CFG, args)
    assert "resumed at step 5" in p2.stdout + p2.stderr
    assert [r["loss"] for r in metrics(run) if "loss" in r] == [r["loss"] for r in reference if "loss" in r]


def test_a_signal_during_a_save_leaves_it_committed_then_stops_at_the_next_step(tmp_path, small_corpus,
                                                                                  reference):
    # SIGTERM lands inside the periodic save of step 6 on rank 0: that save still commits (the handler only
    # records the signal), the ranks stop after step 7 with its checkpoint, and the resume is exact
    args = base(tmp_path, small_corpus, "insave", STEPS, ["checkpoint.every_steps=6"])
    p = torchrun(CFG, args, env={"SCPRETRAIN_FAULT": "signal_in_save:rank=0:step=6"}, check=False)
    out = p.stdout + p.stderr
    run = tmp_path / "runs" / "insave"
    assert "[fault] signal_in_save: SIGTERM to rank 0 inside the save of step 6" in out
    assert _committed(run) == [6, 7] and json.loads((run / "preempted.json").read_text())["step"] == 7
    p2 = torchrun(CFG, args)
    assert "resumed at step 7" in p2.stdout + p2.stderr
    assert [r["loss"] for r in metrics(run) if "loss" in r] == [r["loss"] for r in reference if "loss" in r]
