"""Every file of this repository that the README, BENCHMARKS.md or launch/ names exists (no stale references)."""
from __future__ import annotations

import re

from tests.conftest import REPO

PATH = re.compile(r"\b(?:configs|launch|benchmarks|tests|train|evaluate|sharding|data_loader|scmodels|scpretrain)/"
                  r"[A-Za-z0-9_./-]+\.(?:py|yaml|sh|sbatch|md|example|toml|txt)\b")


def test_every_named_repository_path_exists():
    sources = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "launch").glob("*"))]
    missing = []
    for src in sources:
        if not src.is_file():
            continue
        for n, line in enumerate(src.read_text(errors="replace").splitlines(), 1):
            missing += [f"{src.relative_to(REPO)}:{n}: {p}" for p in PATH.findall(line) if not (REPO / p).exists()]
    assert not missing, "\n".join(missing)
