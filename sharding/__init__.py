"""Turning sources into a corpus (Zarr shards and/or a TileDB-SOMA experiment, vocab.tsv, manifest.json).

The reading side used by the loader lives in ``sharding.manifest``:
``read_manifest``, ``read_vocab``, ``vocab_sha256`` and ``shard_sha256``.
"""

from scpretrain.sharding.errors import InputError

__all__ = ["InputError"]
