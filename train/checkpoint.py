"""Checkpoints that survive failures.

DeepSpeed's own saves are not atomic and its ``latest`` file is written by rank 0 without
waiting for the others (the design notes' RELIABILITY.md, outside this repository). So: every rank saves under a tag, the ranks agree on
success (all-reduce of an ok flag), and only then rank 0 writes our commit marker ``COMMITTED``
(temp file + fsync + rename). Only committed tags are ever loaded; a tag that fails to load on
any rank is skipped for the previous one; existing checkpoints are never silently ignored.
The marker records the size and sha256 of every file of the checkpoint (fsynced first); a
checkpoint whose files differ from it is refused before anything loads it.

Checkpoints are trusted input: DeepSpeed reads them with ``torch.load(weights_only=False)``,
which can run code planted in a file. The integrity record catches a file changed after the
save, not a checkpoint made by someone else: share exports (safetensors), not checkpoints.

Elastic resume: a checkpoint saved at data-parallel size W loads at W' != W. ZeRO 0 keeps the whole
optimizer state in one file and loads anywhere; under ZeRO 1-3 the partitioned optimizer state is
converted once, on rank 0, into DeepSpeed's universal checkpoint (``ds_to_universal``: one fp32
master weight, Adam moments and step count per parameter) under ``<tag>/universal/`` and loaded
with ``load_universal``. Exact across the change: fp32 master weights, Adam moments and step, the
learning-rate schedule and the step count, and the data stream (a global cursor). Not the same as
an uninterrupted run: the global batch is ``batch_size x world size``, so later steps see other
batches.

Per-rank state lost under ZeRO 0-2 (DeepSpeed keeps only rank 0's ``client_state``) is avoided
by design: the data-stream cursor is global (saved once, in ``trainer_state.json``) and masks
and dropout are seeded from (seed, rank, step), so no per-rank RNG state is needed.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from scpretrain.scmodels.atomic import file_sha256, fsync_tree, replace_dir, temp_sibling, write_atomic
from scpretrain.train import comm, faults

MARKER = "COMMITTED"
TRAINER_STATE = "trainer_state.json"
# a deepspeed.DeepSpeedEngine (not imported here: this module's helpers also serve `train export`)
Engine = Any


class CheckpointError(RuntimeError):
    pass


def _device(engine) -> torch.device:
    return getattr(engine, "device", None) or torch.device("cpu")


def _atomic_write(path: Path, text: str) -> None:
    write_atomic(path, text.encode())  # temp file + fsync + rename + fsync of the directory


def file_records(tag_dir: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file of a checkpoint but its marker."""
    return {str(p.relative_to(tag_dir)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MARKER}


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
        if p.stat().st_size != want["size"] or file_sha256(p) != want["sha256"]:
            return f"{p}: differs from its commit marker (size or sha256); the checkpoint was changed after it was saved"
    return None


def saved_world_size(tag_dir: Path) -> int | None:
    """The data-parallel size a checkpoint was saved at, from its ZeRO optimizer partitions (one per rank);
    None under ZeRO 0 (one unpartitioned optimizer state, loadable at any world size)."""
    n = len(list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")))
    return n or None


UNIVERSAL = "universal"


def _source_id(tag_dir: Path) -> str:
    return file_sha256(tag_dir / MARKER)


def to_universal(tag_dir: Path) -> Path:
    """``<tag>/universal``: the checkpoint as DeepSpeed's universal checkpoint, converted once (rank 0 only).
    Built in a temporary folder and renamed into place; reused while it names the same commit marker."""
    import argparse
    import io

    out = tag_dir / UNIVERSAL
    source = out / "SOURCE"
    if source.is_file() and source.read_text() == _source_id(tag_dir):
        return out
    from deepspeed.checkpoint import ds_to_universal

    tmp = temp_sibling(out)
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{tag_dir}: conversion to a universal checkpoint (for another world size) failed: "
                              f"{e!r}; resume at the world size it was saved at ({saved_world_size(tag_dir)} "
                              f"ranks)\n{log.getvalue()[-2000:]}") from e
    (tmp / "SOURCE").write_text(_source_id(tag_dir))
    return replace_dir(tmp, out)


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


def committed_tags(root: Path) -> list[str]:
    """Committed tags, newest first."""
    if not root.exists():
        return []
    return sorted((p.name for p in root.iterdir() if (p / MARKER).exists()), reverse=True)


def any_tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")) if root.exists() else []


class _GuardedWrites:
    """The engine's checkpoint writer for one save, failures recorded instead of raised.

    DeepSpeed's ``save_checkpoint`` has collectives after its file writes (a tag check, barriers).
    A rank whose write raised would skip them and enter our commit all-reduce while the others wait
    in a barrier: a hang. With its failures recorded, every rank goes through the same collectives and
    the outcome is agreed afterwards."""

    def __init__(self, inner, rank: int, step: int):
        self._inner, self._rank, self._step, self.failed = inner, rank, step, None

    def save(self, state_dict, path):
        try:
            faults.maybe_raise("raise_in_save", self._rank, self._step, str(path))
            return self._inner.save(state_dict, path)
        except Exception as e:  # noqa: BLE001 - recorded, agreed on after DeepSpeed's collectives
            self.failed = self.failed or f"{path}: {e!r}"
            return None

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def _abandon(rank: int, tag: str, e: BaseException) -> None:
    """An exception inside DeepSpeed's save but outside its file writes: where this rank stopped among
    DeepSpeed's collectives is unknown, so it cannot agree with the others. It exits; the launcher stops
    the job; the checkpoint has no commit marker and the previous one is what the next start loads."""
    import os
    import traceback

    traceback.print_exc()
    print(f"[rank {rank}] checkpoint {tag} failed inside DeepSpeed's save: {e!r}. Not committed; this rank exits "
          "so the job stops instead of hanging; the next start resumes from the previous committed checkpoint",
          flush=True)
    os._exit(1)


def save(engine: Engine, root: Path, step: int, trainer_state: dict, extra_files: dict[str, str], keep: int) -> bool:
    """Save on every rank; commit only if all ranks succeeded. Returns whether it committed.

    A failed write on any rank (disk full, permissions, I/O error) is agreed on by all ranks: nothing
    is committed, every rank returns False, the previous committed checkpoint stays the newest."""
    tag = tag_of(step)
    rank, device = comm.rank(), _device(engine)
    marker = root / tag / MARKER
    if rank == 0 and marker.exists():  # re-saving a step: it is not committed until this save is
        marker.unlink()
    comm.barrier()
    writes = _GuardedWrites(engine.checkpoint_engine, rank, step)
    engine.checkpoint_engine = writes
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    except Exception as e:  # noqa: BLE001
        _abandon(rank, tag, e)
    finally:
        engine.checkpoint_engine = writes._inner
    failure = writes.failed
    if failure is None:
        try:
            faults.maybe_kill("kill_in_save", rank, step)
            faults.maybe_signal(rank, step, "signal_in_save")
            if rank == 0:
                for name, text in {TRAINER_STATE: json.dumps(trainer_state), **extra_files}.items():
                    _atomic_write(root / tag / name, text)
        except Exception as e:  # noqa: BLE001 - any failure on any rank means "not committed"
            failure = repr(e)
    if failure is not None:
        print(f"[rank {rank}] checkpoint {tag} not written: {failure}", flush=True)
    ok = comm.agree(failure is None, device)
    if ok and rank == 0:
        fsync_tree(root / tag)
        _atomic_write(marker, json.dumps({"step": step, "files": file_records(root / tag)}))
        for old in committed_tags(root)[keep:]:
            shutil.rmtree(root / old, ignore_errors=True)
    comm.barrier()
    return ok


@contextlib.contextmanager
def _universal_load(engine: Engine, on: bool):
    """DeepSpeed reads ``checkpoint.load_universal`` from its config only inside ``load_checkpoint``
    (0.19.8): switch it on for one load of a converted checkpoint instead of building the engine twice."""
    cfg = engine._config
    if not on:
        yield
        return
    if not hasattr(cfg, "load_universal_checkpoint"):
        raise CheckpointError("this DeepSpeed cannot load universal checkpoints; resume at the world size the "
                              "checkpoint was saved at")
    before = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = True
    try:
        yield
    finally:
        cfg.load_universal_checkpoint = before


def load_latest(engine: Engine, root: Path, resume: str, allow_fresh_start: bool) -> dict | None:
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
    rank, world, device = comm.rank(), comm.world_size(), _device(engine)
    for tag in tags:
        # rank 0 checks the files and reads the saved world size; everyone acts on its answer
        problem, saved = comm.broadcast_object(
            (verify(root / tag), saved_world_size(root / tag)) if rank == 0 else (None, None))
        if problem is not None:
            if rank == 0:
                print(f"[rank 0] checkpoint {tag} refused: {problem}; trying an older one", flush=True)
            continue
        elastic = saved is not None and saved != world
        load_dir, load_tag = str(root), tag
        if elastic:
            converted = True
            if rank == 0:
                try:
                    out = to_universal(root / tag)
                    print(f"[rank 0] checkpoint {tag} was saved at world size {saved}, resuming at {world}: "
                          f"optimizer state re-partitioned through the universal checkpoint {out}", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"[rank 0] checkpoint {tag}: {e}; trying an older one", flush=True)
                    converted = False
            if not comm.agree(converted, device):
                continue
            load_dir, load_tag = str(root / tag), UNIVERSAL
        ok, state = True, None
        try:
            with _universal_load(engine, elastic):
                path, _ = engine.load_checkpoint(load_dir, tag=load_tag, load_optimizer_states=True,
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
