"""Preemption: a signal ends the run at a committed checkpoint of the step it was on.

SLURM (preemption, ``scancel``, the time limit), Kubernetes and spot/cloud schedulers send
SIGTERM, or a warning signal such as SIGUSR1 (``sbatch --signal``), some seconds before they
kill. ``SignalWatch`` only records the signal; the training loop checks it after every step,
the ranks agree (one all-reduce of a flag, so a rank that did not see the signal still joins),
save and commit that step's checkpoint with the stream state, and exit with ``EXIT_PREEMPTED``.
A second signal during the save is recorded and otherwise ignored: the save finishes, or, if
something kills the process, the commit protocol leaves the previous committed checkpoint as
the one to resume from.
"""
from __future__ import annotations

import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "saved, resubmit me"; the job resumes with the same command


class SignalWatch:
    def __init__(self, names: list[str]):
        self.received: str | None = None
        self._old: dict[int, object] = {}
        for name in names:
            sig = getattr(signal, name, None)
            if not isinstance(sig, signal.Signals):
                raise ValueError(f"checkpoint.save_on_signal: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
