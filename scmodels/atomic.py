"""Files and folders that readers see whole or not at all. Standard library only.

``write_atomic`` replaces one file (temp file, fsync, rename, fsync of the folder). ``replace_dir``
puts a fully written folder in place of another in one step: on Linux the two are swapped with
``renameat2(RENAME_EXCHANGE)``, so there is no moment without a complete folder under the name;
elsewhere the old folder is moved aside first and put back by the next writer if a crash came in
between. Leftovers of crashed writers (``.NAME.tmp-PID``, ``.NAME.old-PID`` of dead processes) are
removed by the next write.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """A folder (or a file) on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file under ``root`` and every folder, on disk.

    Files are synced from 16 threads: concurrent fsyncs share the filesystem's journal commits, so a Zarr
    shard's ~700 chunk files reach the disk 3x faster than one after another (0.056 s vs 0.15-0.2 s)."""
    walked = list(os.walk(root))
    files = [os.path.join(d, name) for d, _, names in walked for name in names]
    if len(files) > 8:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(fsync_dir, files))
    else:
        for f in files:
            fsync_dir(f)
    for d, _, _ in walked:
        fsync_dir(Path(d))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks (a large h5ad or weights file is never loaded whole):
    the one file hash of corpus manifests, checkpoint markers, exports, heads and imported weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes, tmp: Path | None = None) -> Path:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never a torn one."""
    tmp = tmp or path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def check_replaceable(out: Path, marker: str, what: str) -> None:
    """``out`` is replaced as a whole: refuse a folder that holds anything but an earlier ``what``
    (recognised by its ``marker`` file), so a mistyped path never deletes someone's files."""
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise FileExistsError(f"{out}: exists and is not a {what} (no {marker}); it would be replaced as a whole. "
                              f"Pass a new or empty folder, or the folder of an earlier {what}")


def temp_sibling(out: Path) -> Path:
    """An empty folder beside ``out`` to write the new version into (then ``replace_dir``)."""
    _clean_leftovers(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_folder(out: Path, marker: str, what: str, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary sibling folder, which then replaces ``out`` in one step
    (``out`` may hold only an earlier ``what``, recognised by its ``marker`` file)."""
    out = Path(out)
    check_replaceable(out, marker, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, out)


def replace_dir(tmp: Path, out: Path) -> Path:
    """Put the folder ``tmp`` (fully written) at ``out``, replacing what was there in one step."""
    fsync_tree(tmp)
    if not out.exists():
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp)  # now the old version
    else:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)  # a crash here leaves old aside: the next writer puts it back (_clean_leftovers)
        os.rename(tmp, out)
        shutil.rmtree(old)
    fsync_dir(out.parent)
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system or filesystem cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(out: Path) -> None:
    pat = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        m = pat.match(p.name)
        if not m or (_alive(int(m.group(2))) and int(m.group(2)) != os.getpid()):
            continue
        if m.group(1) == "old" and not out.exists():
            os.rename(p, out)  # a writer died between its two renames: the old version comes back
        else:
            shutil.rmtree(p, ignore_errors=True)
