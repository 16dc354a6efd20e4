"""A damaged corpus stops the loader before the first batch, naming what is wrong (issue 14, item 1):
a missing chunk file would otherwise stream as zeros (data) or as gene 0 (indices)."""
from __future__ import annotations

import json
import shutil

import pytest

from scpretrain.data_loader import StreamingLoader
from scpretrain.data_loader.zarr_chunks import ChunkedArray, MissingChunk


@pytest.fixture
def corpus(tmp_path, small_corpus):
    out = tmp_path / "copy"
    shutil.copytree(small_corpus, out)
    return out


@pytest.mark.parametrize("array", ["data", "indices"])
def test_missing_chunk_is_refused_at_open_naming_it(corpus, array):
    shard = corpus / json.loads((corpus / "manifest.json").read_text())["zarr"]["shards"][1]["path"]
    (shard / "X" / array / "c" / "0").unlink()
    with pytest.raises(MissingChunk) as e:
        StreamingLoader(corpus, batch_size=64, seed=0, rank=0, world_size=1)
    msg = str(e.value)
    assert f"chunk 0 of X/{array} of shard {shard.name} is missing" in msg and "python -m sharding verify" in msg
    with pytest.raises(MissingChunk):  # and a reader that gets there anyway never fills in zeros
        ChunkedArray(shard / "X" / array)[0:10]


def test_indptr_that_disagrees_with_the_manifest_is_refused(corpus):
    man = json.loads((corpus / "manifest.json").read_text())
    man["zarr"]["shards"][0]["nnz"] += 1
    (corpus / "manifest.json").write_text(json.dumps(man))
    loader = StreamingLoader(corpus, batch_size=64, seed=0, rank=0, world_size=1)
    with pytest.raises(OSError, match=r"X/indptr holds .* non-zeros, the manifest .*sharding verify"):
        for _ in loader:  # the first window that touches shard 0
            pass
