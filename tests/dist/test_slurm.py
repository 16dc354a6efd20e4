"""The SLURM path on a real one-node Slurm started on this machine (launch/local_slurm.py; issue 25):
submit -> finish -> export; the warning signal and `scontrol requeue` -> a committed checkpoint of the step,
the job requeued, the second run resumes there and finishes with the losses of an uninterrupted run.
Skipped, with the reason, only where Slurm cannot start (no root, no package access)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.dist.test_pretrain_dist import base, metrics, torchrun

pytestmark = pytest.mark.dist
CFG = "configs/pretrain/demo_mae.yaml"
STEPS = 30


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from scpretrain.launch import local_slurm

    d = tmp_path_factory.mktemp("slurm")
    try:
        env = local_slurm.start(d)
    except (local_slurm.SlurmUnavailable, OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"no local Slurm here: {e}")
    # PYTHON: the job runs this interpreter (the suite may run from another venv than .venv)
    yield {**os.environ, **env, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "PYTHON": sys.executable}
    local_slurm.stop(d)


def submit(env: dict, tmp: Path, args: list[str], extra_env: dict | None = None) -> str:
    p = subprocess.run(["sbatch", "--parsable", "--cpus-per-task", "2", "--chdir", str(REPO), "--output",
                        str(tmp / "slurm-%j.out"), "launch/slurm.sbatch", CFG, *args],
                       env={**env, **(extra_env or {})}, capture_output=True, text=True, check=True)
    return p.stdout.strip().split(";")[0]


def job(env: dict, jid: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", jid], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def logged_step(run: Path) -> int:
    if not (run / "metrics.jsonl").exists():
        return 0
    return max([r["step"] for r in metrics(run) if "loss" in r] or [0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("ref")
    torchrun(CFG, base(tmp, small_corpus, "ref", STEPS, ["checkpoint.every_steps=1000"]))
    return [r["loss"] for r in metrics(tmp / "runs" / "ref") if "loss" in r]


def test_sbatch_on_a_cpu_partition_finishes_and_exports(slurm, tmp_path, small_corpus):
    jid = submit(slurm, tmp_path, base(tmp_path, small_corpus, "sb", 4) + [f"export_dir={tmp_path / 'export'}"])
    wait_for(lambda: job(slurm, jid).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300, "the job")
    log = (tmp_path / f"slurm-{jid}.out").read_text()
    assert job(slurm, jid)["JobState"] == "COMPLETED", log[-3000:]
    assert "0 GPU(s), 2 process(es) per node" in log
    assert json.loads((tmp_path / "export" / "config.json").read_text())["provenance"]["steps"] == 4


def test_preempted_job_is_requeued_and_resumes_exactly_twice(slurm, tmp_path, small_corpus, reference):
    """One job, stopped twice: first by the time-limit warning (what --signal=B:USR1@180 sends), then by
    `scontrol requeue` (what preemption does: SIGTERM to every process of the job, requeue by Slurm)."""
    run = tmp_path / "runs" / "pre"
    jid = submit(slurm, tmp_path, base(tmp_path, small_corpus, "pre", STEPS, ["checkpoint.every_steps=1000"]),
                 {"SCPRETRAIN_FAULT": "slow:ms=300"})
    stops = []
    for restart, how in enumerate(("warning", "requeue")):
        after = stops[-1] + 3 if stops else 3
        wait_for(lambda: logged_step(run) >= after and job(slurm, jid).get("Restarts") == str(restart), 300,
                 f"step {after} of run {restart + 1}")
        if how == "warning":
            subprocess.run(["scancel", "--signal=USR1", "--batch", jid], env=slurm, check=True)
        else:
            subprocess.run(["scontrol", "requeue", jid], env=slurm, check=True)
        wait_for(lambda: (run / "preempted.json").exists()
                 and json.loads((run / "preempted.json").read_text())["step"] >= after, 120,
                 f"the checkpoint of the {how} stop")
        step = json.loads((run / "preempted.json").read_text())["step"]
        wait_for(lambda: (run / "checkpoints" / f"step-{step:08d}" / "COMMITTED").exists(), 60, "the commit marker")
        assert after <= step < STEPS
        stops.append(step)
    wait_for(lambda: job(slurm, jid).get("JobState") == "COMPLETED", 420, "the requeued job to finish")
    info, log = job(slurm, jid), (tmp_path / f"slurm-{jid}.out").read_text()
    assert int(info["Restarts"]) == 2, log[-3000:]
    assert all(f"resumed at step {s}" in log for s in stops) and "(restart 2)" in log
    losses = [r["loss"] for r in metrics(run) if "loss" in r]
    assert losses == reference  # every step once, the same cells as an uninterrupted run


def test_corpus_build_as_array_jobs_equals_the_one_process_build(slurm, tmp_path):
    """launch/build_corpus.sbatch as documented: --plan, a phase-1 array, a phase-2 array after it, the
    finish after that; the published corpus is the one-process build's (same shards, same checksums)."""
    from scpretrain.sharding.build import BuildConfig, build

    src = ["--source", "synthetic://cells=3000,genes=200,density=0.05,types=4,datasets=3"]
    ref = build(BuildConfig(sources=[src[1]], out=tmp_path / "ref", cells_per_shard=500, progress=False),
                log=lambda _m: None)
    out = tmp_path / "arr"
    py = [sys.executable, "-m", "scpretrain.sharding", "build", "--out", str(out)]
    subprocess.run([*py, *src, "--cells-per-shard", "500", "--plan", "--tasks", "3"], env=slurm, check=True,
                   cwd=REPO, capture_output=True)

    def sbatch(*args: str) -> str:
        p = subprocess.run(["sbatch", "--parsable", "--cpus-per-task", "1", "--chdir", str(REPO),
                            "--output", str(tmp_path / "build-%A_%a.out"), *args], env=slurm,
                           capture_output=True, text=True, check=True)
        return p.stdout.strip().split(";")[0]

    p1 = sbatch("--array=0-2", "launch/build_corpus.sbatch", str(out), "1")
    p2 = sbatch("--array=0-2", f"--dependency=afterok:{p1}", "launch/build_corpus.sbatch", str(out), "2")
    sbatch(f"--dependency=afterok:{p2}", "launch/build_corpus.sbatch", str(out), "finish")
    try:
        wait_for(lambda: (out / "manifest.json").exists(), 300, "the finish job")
    except AssertionError as e:
        logs = " | ".join(f"{p.name}: {p.read_text()[-400:]}" for p in sorted(tmp_path.glob("build-*.out")))
        raise AssertionError(f"{e}; job logs: {logs}") from None
    got = json.loads((out / "manifest.json").read_text())
    assert [s["sha256"] for s in got["zarr"]["shards"]] == [s["sha256"] for s in ref["zarr"]["shards"]]
    assert {k: v for k, v in got.items() if k != "created"} == {k: v for k, v in ref.items() if k != "created"}
    logs = "".join(p.read_text() for p in tmp_path.glob("build-*.out"))
    assert all(f"phase {ph}, task {t}" in logs for ph in (1, 2) for t in range(3))
