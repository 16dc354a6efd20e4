"""Failures cost minutes, never the run: killed ranks, killed saves, corrupt checkpoints."""
from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tests.dist.test_pretrain_dist import base, metrics, torchrun

pytestmark = pytest.mark.dist
CFG = "configs/pretrain/demo_mae.yaml"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_corpus):
    """An uninterrupted 8-step run every fault scenario must reproduce."""
    tmp = tmp_path_factory.mktemp("ref")
    torchrun(CFG, base(tmp, small_corpus, "ref", 8))
    return metrics(tmp / "runs" / "ref")


def test_sigkill_a_rank_torchrun_restarts_and_matches(tmp_path, small_corpus, reference):
    p = torchrun(CFG, base(tmp_path, small_corpus, "killed", 8), extra=("--max-restarts=1",),
                 env={"SCPRETRAIN_FAULT": "kill:rank=1:step=5"})
    assert "[fault] kill: SIGKILL rank 1 at step 5" in p.stdout + p.stderr
    assert "resumed at step 3" in p.stdout + p.stderr  # checkpoints every 3 steps
    rows = metrics(tmp_path / "runs" / "killed")
    assert [r["step"] for r in rows] == list(range(1, 9))  # steps after the checkpoint re-logged once
    assert rows[-1]["loss"] == reference[-1]["loss"]
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference]


def test_rank_killed_mid_save_next_start_uses_previous_checkpoint(tmp_path, small_corpus, reference):
    p = torchrun(CFG, base(tmp_path, small_corpus, "midsave", 8), env={"SCPRETRAIN_FAULT": "kill_in_save:rank=1:step=6"},
                 check=False)
    assert p.returncode != 0
    ck = tmp_path / "runs" / "midsave" / "checkpoints"
    assert (ck / "step-00000006").exists() and not (ck / "step-00000006" / "COMMITTED").exists()
    assert (ck / "step-00000003" / "COMMITTED").exists()
    p2 = torchrun(CFG, base(tmp_path, small_corpus, "midsave", 8))
    assert "resumed at step 3" in p2.stdout + p2.stderr
    assert metrics(tmp_path / "runs" / "midsave")[-1]["loss"] == reference[-1]["loss"]


def test_a_write_failing_on_one_rank_ends_the_run_clearly_and_the_next_start_resumes(tmp_path, small_corpus,
                                                                                       reference):
    """Rank 1's first file write of step 6 raises (disk full) inside DeepSpeed's save: no hang in its barriers,
    the ranks agree the save failed, the run ends naming the rank, file and error; step 3 is resumed next."""
    p = torchrun(CFG, base(tmp_path, small_corpus, "enospc", 8), env={"SCPRETRAIN_FAULT": "raise_in_save:rank=1:step=6"},
                 check=False, timeout=240)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "[rank 1] checkpoint step-00000006 not written" in out and "No space left on device" in out
    assert "zero_pp_rank_1" in out  # the file that failed
    assert "the checkpoint of step 6 did not commit" in out and "step-00000003, is intact" in out
    ck = tmp_path / "runs" / "enospc" / "checkpoints"
    assert not (ck / "step-00000006" / "COMMITTED").exists() and (ck / "step-00000003" / "COMMITTED").exists()
    p2 = torchrun(CFG, base(tmp_path, small_corpus, "enospc", 8))
    assert "resumed at step 3" in p2.stdout + p2.stderr
    assert metrics(tmp_path / "runs" / "enospc")[-1]["loss"] == reference[-1]["loss"]


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, small_corpus, reference):
    torchrun(CFG, base(tmp_path, small_corpus, "corrupt", 8, ["stop_at_step=6"]))
    ck = tmp_path / "runs" / "corrupt" / "checkpoints"
    model_file = ck / "step-00000006" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated, yet marked committed
    p = torchrun(CFG, base(tmp_path, small_corpus, "corrupt", 8))
    out = p.stdout + p.stderr
    assert "checkpoint step-00000006 refused" in out and "differs from its commit marker" in out
    assert "resumed at step 3" in out
    assert metrics(tmp_path / "runs" / "corrupt")[-1]["loss"] == reference[-1]["loss"]


def test_existing_checkpoints_are_never_silently_ignored(tmp_path, small_corpus):
    torchrun(CFG, base(tmp_path, small_corpus, "fresh", 4, ["stop_at_step=3"]))
    p = torchrun(CFG, base(tmp_path, small_corpus, "fresh", 4, ["checkpoint.resume=never"]), check=False)
    assert p.returncode != 0
    assert "checkpoint.allow_fresh_start=true" in p.stdout + p.stderr
    ck = tmp_path / "runs" / "fresh" / "checkpoints"
    (ck / "step-00000003" / "COMMITTED").unlink()  # the only checkpoint becomes incomplete
    p = torchrun(CFG, base(tmp_path, small_corpus, "fresh", 4), check=False)
    assert p.returncode != 0 and "none is complete" in p.stdout + p.stderr


def test_checkpoint_changed_after_its_commit_is_refused_and_not_exported(tmp_path, small_corpus, reference):
    torchrun(CFG, base(tmp_path, small_corpus, "tamper", 8, ["stop_at_step=6"]))
    ck = tmp_path / "runs" / "tamper" / "checkpoints"
    state = ck / "step-00000006" / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 6', '"step": 7'))  # same kind of file, other content
    p = run_cli(["-m", "train", "export", str(ck / "latest"), "--out", str(tmp_path / "exp")], check=False)
    assert p.returncode != 0 and "trainer_state.json: differs from its commit marker" in p.stderr
    assert not (tmp_path / "exp").exists()
    p = torchrun(CFG, base(tmp_path, small_corpus, "tamper", 8))
    out = p.stdout + p.stderr
    assert "checkpoint step-00000006 refused" in out and "resumed at step 3" in out
    assert metrics(tmp_path / "runs" / "tamper")[-1]["loss"] == reference[-1]["loss"]


def test_resume_on_another_corpus_is_refused_unless_allowed(tmp_path, small_corpus):
    import shutil

    args = base(tmp_path, small_corpus, "other", 6, ["stop_at_step=3"])
    torchrun(CFG, args)
    assert (tmp_path / "runs" / "other" / "checkpoints" / "step-00000003" / "vocab.tsv").exists()
    other = tmp_path / "rebuilt"
    shutil.copytree(small_corpus, other)
    man = other / "manifest.json"
    man.write_text(man.read_text().replace('"n_cells"', '"n_cells" ', 1))  # a different manifest
    moved = [a if not a.startswith("corpus=") else f"corpus={other}" for a in base(tmp_path, small_corpus, "other", 6)]
    p = torchrun(CFG, moved, check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "was trained on a corpus with manifest sha256" in out
    assert "checkpoint.allow_new_corpus=true" in out
    p = torchrun(CFG, moved + ["checkpoint.allow_new_corpus=true"])
    assert "resumed at step 3" in p.stdout + p.stderr
