"""Checkpoints that survive failures.

DeepSpeed's own saves are not atomic and its ``latest`` file is written by rank 0 without
waiting for the others (RELIABILITY.md). So: every rank saves under a tag, the ranks agree on
success (all-reduce of an ok flag), and only then rank 0 writes our commit marker ``COMMITTED``
(temp file + fsync + rename). Only committed tags are ever loaded; a tag that fails to load on
any rank is skipped for the previous one; existing checkpoints are never silently ignored.
The marker records the size and sha256 of every file of the checkpoint (fsynced first); a
checkpoint whose files differ from it is refused before anything loads it.

Checkpoints are trusted input: DeepSpeed reads them with ``torch.load(weights_only=False)``,
which can run code planted in a file. The integrity record catches a file changed after the
save, not a checkpoint made by someone else: share exports (safetensors), not checkpoints.

Per-rank state lost under ZeRO 0-2 (DeepSpeed keeps only rank 0's ``client_state``) is avoided
by design: the data-stream cursor is global (saved once, in ``trainer_state.json``) and masks
and dropout are seeded from (seed, rank, step), so no per-rank RNG state is needed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from sharding.manifest import write_atomic
from train import comm, faults

MARKER = "COMMITTED"
TRAINER_STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    pass


def _device(engine) -> torch.device:
    return getattr(engine, "device", None) or torch.device("cpu")


def _atomic_write(path: Path, text: str) -> None:
    write_atomic(path, text.encode())  # temp file + fsync + rename + fsync of the directory


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_records(tag_dir: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file of a checkpoint but its marker."""
    return {str(p.relative_to(tag_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MARKER}


def _fsync_tree(tag_dir: Path) -> None:
    """Every file of the checkpoint on disk before the marker says it is complete."""
    import os

    for p in tag_dir.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def verify(tag_dir: Path) -> str | None:
    """None when every file the commit marker lists is there with its size and sha256; else what differs.
    Markers written before integrity records (no "files") are accepted as they are."""
    record = json.loads((tag_dir / MARKER).read_text()).get("files")
    if record is None:
        return None
    for rel, want in record.items():
        p = tag_dir / rel
        if not p.is_file():
            return f"{p}: listed in its commit marker but missing"
        if p.stat().st_size != want["size"] or _sha256(p) != want["sha256"]:
            return f"{p}: differs from its commit marker (size or sha256); the checkpoint was changed after it was saved"
    return None


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


def committed_tags(root: Path) -> list[str]:
    """Committed tags, newest first."""
    if not root.exists():
        return []
    return sorted((p.name for p in root.iterdir() if (p / MARKER).exists()), reverse=True)


def any_tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")) if root.exists() else []


def save(engine, root: Path, step: int, trainer_state: dict, extra_files: dict[str, str], keep: int) -> bool:
    """Save on every rank; commit only if all ranks succeeded. Returns whether it committed."""
    tag = tag_of(step)
    rank, device = comm.rank(), _device(engine)
    marker = root / tag / MARKER
    if rank == 0 and marker.exists():  # re-saving a step: it is not committed until this save is
        marker.unlink()
    comm.barrier()
    ok = True
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        faults.maybe_kill("kill_in_save", rank, step)
        faults.maybe_signal(rank, step, "signal_in_save")
        if rank == 0:
            for name, text in {TRAINER_STATE: json.dumps(trainer_state), **extra_files}.items():
                _atomic_write(root / tag / name, text)
    except Exception as e:  # noqa: BLE001 - any failure on any rank means "not committed"
        print(f"[rank {rank}] checkpoint {tag} failed: {e!r}", flush=True)
        ok = False
    ok = comm.agree(ok, device)
    if ok and rank == 0:
        _fsync_tree(root / tag)
        _atomic_write(marker, json.dumps({"step": step, "files": file_records(root / tag)}))
        for old in committed_tags(root)[keep:]:
            shutil.rmtree(root / old, ignore_errors=True)
    comm.barrier()
    return ok


def load_latest(engine, root: Path, resume: str, allow_fresh_start: bool) -> dict | None:
    """Load the newest committed checkpoint that every rank can load; returns its trainer state.

    Which checkpoints exist is read on rank 0 and broadcast: every rank tries the same tags in
    the same order even if their views of a shared filesystem differ. Returns None only when
    starting fresh is legitimate (no checkpoints, or explicitly allowed).
    """
    tags, present = comm.broadcast_object((committed_tags(root), any_tags(root)))
    if resume == "never" or not present:
        if present and not allow_fresh_start:
            raise CheckpointError(
                f"{root}: {len(present)} checkpoint(s) exist but checkpoint.resume=never; "
                "set checkpoint.allow_fresh_start=true to start from step 0 anyway, or use another out_dir")
        return None
    rank, device = comm.rank(), _device(engine)
    for tag in tags:
        problem = verify(root / tag) if rank == 0 else None
        if not comm.agree(problem is None, device):  # rank 0 checked the files; everyone skips the tag
            if rank == 0:
                print(f"[rank 0] checkpoint {tag} refused: {problem}; trying an older one", flush=True)
            continue
        ok, state = True, None
        try:
            path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
            ok = path is not None
            state = json.loads((root / tag / TRAINER_STATE).read_text())
        except Exception as e:  # noqa: BLE001
            print(f"[rank {rank}] checkpoint {tag} unusable: {e!r}; trying an older one", flush=True)
            ok = False
        if comm.agree(ok, device):
            return state
    if allow_fresh_start:
        return None
    raise CheckpointError(
        f"{root}: checkpoints exist ({', '.join(present[-3:])}) but none is complete and loadable on every rank; "
        "set checkpoint.allow_fresh_start=true to start from step 0")
