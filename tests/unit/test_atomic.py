"""Folders replaced whole: exports and heads never half-written, never absent, never mixed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from scpretrain.scmodels.atomic import replace_dir, temp_sibling, write_folder


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_replacing_a_folder_leaves_only_the_new_files_and_no_leftovers(tmp_path):
    out = tmp_path / "export"
    write_folder(out, "config.json", "export", lambda d: [(d / "config.json").write_text("1"), (d / "a").write_text("a")])
    write_folder(out, "config.json", "export", lambda d: (d / "config.json").write_text("2"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] and (out / "config.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_writer_that_fails_leaves_the_previous_folder_as_it_was(tmp_path):
    out = tmp_path / "head"
    write_folder(out, "head.json", "head", lambda d: (d / "head.json").write_text("old"))

    def broken(d):
        (d / "head.json").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_folder(out, "head.json", "head", broken)
    assert (out / "head.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]


def test_a_crash_between_the_two_renames_of_the_fallback_is_repaired_by_the_next_writer(tmp_path):
    out = tmp_path / "export"
    aside = tmp_path / f".export.old-{_dead_pid()}"  # the old version moved aside, the writer died
    aside.mkdir()
    (aside / "config.json").write_text("old")
    leftover = tmp_path / f".export.tmp-{_dead_pid()}"
    leftover.mkdir()
    tmp = temp_sibling(out)
    assert (out / "config.json").read_text() == "old" and not aside.exists() and not leftover.exists()
    (tmp / "config.json").write_text("new")
    replace_dir(tmp, out)
    assert (out / "config.json").read_text() == "new"


def test_a_folder_holding_other_files_is_never_replaced(tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a head"):
        write_folder(precious, "head.json", "head", lambda d: (d / "head.json").write_text("x"))
    assert (precious / "notes.txt").read_text() == "keep me"
