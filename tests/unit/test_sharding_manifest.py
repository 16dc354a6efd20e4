"""The reading side of the corpus contract: refusals of incomplete or unsafe corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scpretrain.sharding import manifest as mf
from scpretrain.sharding.errors import InputError


def _write(corpus: Path, **overrides) -> None:
    manifest = {"format_version": 1, "vocab": {"path": "vocab.tsv", "sha256": "x"},
                "zarr": {"shards": [{"path": "zarr/shard-00000.zarr"}]}, "soma": None, **overrides}
    corpus.mkdir(exist_ok=True)
    mf.write_manifest(corpus, manifest)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        mf.read_manifest(tmp_path)
    assert str(err.value) == (f"{tmp_path}: no manifest.json; this is not a complete corpus "
                              "(re-run `python -m sharding build`)")


def test_atomic_write_leaves_no_temp_and_reads_back(tmp_path: Path) -> None:
    _write(tmp_path)
    assert mf.read_manifest(tmp_path)["zarr"]["shards"][0]["path"] == "zarr/shard-00000.zarr"
    assert not (tmp_path / ".manifest.json.tmp").exists()


@pytest.mark.parametrize("bad", ["/etc/passwd", "../elsewhere/shard.zarr", "zarr/../../x"])
def test_paths_outside_the_corpus_are_refused(tmp_path: Path, bad: str) -> None:
    _write(tmp_path, zarr={"shards": [{"path": bad}]})
    with pytest.raises(InputError, match="refusing a corpus that points outside itself"):
        mf.read_manifest(tmp_path)
    _write(tmp_path, soma={"path": bad})
    with pytest.raises(InputError, match="outside"):
        mf.read_manifest(tmp_path)


def test_unreadable_or_wrong_version(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable manifest"):
        mf.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(InputError, match="format_version is 99"):
        mf.read_manifest(tmp_path)
