"""Transparent huge pages for a corpus build's large, short-lived buffers (glibc's ``glibc.malloc.hugetlb``).

A build allocates and frees buffers of hundreds of MB per shard (TileDB's write path above all); glibc hands
each back to the kernel and the next shard faults every 4 KiB page in again: 1.9M page faults in the SOMA
phase 2 of a 200k-cell build. With ``glibc.malloc.hugetlb=1`` malloc asks for transparent huge pages on the
kernels that only give them on request (``madvise`` mode): 0.2M faults, the SOMA build 7% faster in paired
runs, the same peak RSS (BENCHMARKS.md). The tunable is read when the process starts, so ``python -m
sharding build`` restarts itself once with it set. ``SCPRETRAIN_HUGEPAGES=0`` turns this off; other
platforms and C libraries are left as they are.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"


def _glibc_at_least(major: int, minor: int) -> bool:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # type: ignore[union-attr]
        got = tuple(int(x) for x in version.split(".")[:2])
    except (ValueError, OSError, AttributeError):
        return False
    return name == "glibc" and got >= (major, minor)


def restart_with_huge_pages() -> None:
    """Replace this process by the same command with the tunable set (returns when nothing is to be done)."""
    if sys.platform != "linux" or os.environ.get("SCPRETRAIN_HUGEPAGES", "1") == "0":
        return
    current = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current or not _glibc_at_least(2, 35) or not getattr(sys, "orig_argv", None):
        return
    env = {**os.environ, "GLIBC_TUNABLES": f"{current}:{TUNABLE}" if current else TUNABLE}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
