"""Fault injection for the reliability tests (off unless ``SCPRETRAIN_FAULT`` is set).

``SCPRETRAIN_FAULT="kill:rank=1:step=5"``      SIGKILL rank 1 right after it finishes step 5;
``SCPRETRAIN_FAULT="kill_in_save:rank=1:step=6"`` SIGKILL rank 1 inside the checkpoint save of step 6,
after its DeepSpeed files are written and before the ranks agree to commit.
``SCPRETRAIN_FAULT="raise_in_save:rank=1:step=6"`` rank 1's first checkpoint file write of step 6 raises
OSError (disk full), inside DeepSpeed's save, before its barriers.
Faults fire only on a job's first attempt (torchrun's ``TORCHELASTIC_RESTART_COUNT`` = 0), so a
restarted job runs clean, as after a real node failure.
"""
from __future__ import annotations

import os
import signal


def _spec() -> dict | None:
    raw = os.environ.get("SCPRETRAIN_FAULT")
    if not raw or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    kind, *kv = raw.split(":")
    spec = {"kind": kind}
    for item in kv:
        k, v = item.split("=")
        spec[k] = int(v)
    return spec


def maybe_kill(point: str, rank: int, step: int) -> None:
    spec = _spec()
    if spec and spec["kind"] == point and spec.get("rank") == rank and spec.get("step") == step:
        print(f"[fault] {point}: SIGKILL rank {rank} at step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_signal(rank: int, step: int, point: str = "signal") -> None:
    """``SCPRETRAIN_FAULT="signal:rank=1:step=5:sig=10"``: send signal ``sig`` (default SIGTERM) to this rank's own
    process after step 5 (a preemption warning that reached one rank only); ``signal_in_save:...`` sends it
    inside the save of step 5, after DeepSpeed wrote its files and before the ranks agree to commit."""
    spec = _spec()
    if spec and spec["kind"] == point and spec.get("rank") == rank and spec.get("step") == step:
        sig = spec.get("sig", int(signal.SIGTERM))
        where = "inside the save of" if point == "signal_in_save" else "after"
        print(f"[fault] {point}: {signal.Signals(sig).name} to rank {rank} {where} step {step}", flush=True)
        os.kill(os.getpid(), sig)


def maybe_sleep() -> None:
    """``SCPRETRAIN_FAULT="slow:ms=300"``: every step takes 300 ms longer (room to deliver a signal mid-run)."""
    spec = _spec()
    if spec and spec["kind"] == "slow":
        import time

        time.sleep(spec.get("ms", 100) / 1000)


def maybe_raise(point: str, rank: int, step: int, what: str) -> None:
    spec = _spec()
    if spec and spec["kind"] == point and spec.get("rank") == rank and spec.get("step") == step:
        import errno

        print(f"[fault] {point}: OSError on rank {rank} writing {what} at step {step}", flush=True)
        raise OSError(errno.ENOSPC, "No space left on device (injected)", what)
