"""Every collective goes through train/comm.py, which puts its tensors on the engine's device (NCCL rejects
CPU tensors). A direct torch.distributed collective anywhere else fails this test."""
from __future__ import annotations

import re

import torch

from tests.conftest import REPO
from scpretrain.train import comm

COLLECTIVES = re.compile(r"\bdist\.(all_reduce|all_gather\w*|broadcast\w*|reduce\w*|gather|scatter\w*|barrier)\(")


def test_no_collective_outside_comm():
    offenders = []
    for folder in ("train", "data_loader", "evaluate", "scmodels", "launch", "sharding"):
        for path in (REPO / folder).rglob("*.py"):
            if path == REPO / "train" / "comm.py":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if COLLECTIVES.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "collectives outside train/comm.py:\n" + "\n".join(offenders)


def test_comm_is_the_identity_without_a_process_group():
    assert comm.agree(True) and not comm.agree(False) and comm.agree(True, everyone=False)
    assert comm.from_rank0(True) and comm.broadcast_object({"a": 1}) == {"a": 1}
    assert comm.mean([1.0, 3.0]).tolist() == [1.0, 3.0]
    assert [t.tolist() for t in comm.gather(torch.tensor([2.0]))] == [[2.0]]
