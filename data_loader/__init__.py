"""Streaming loader: exactly-once, resumable batches of CSR counts from Zarr shards or TileDB-SOMA.

Public API: ``StreamingLoader`` (the iterable of batches with ``state_dict``/``load_state_dict``),
``MixedLoader`` (several corpora in fixed proportions per batch) and ``model_inputs`` (CSR batch ->
model inputs on the device).
"""
from scpretrain.data_loader.collate import model_inputs
from scpretrain.data_loader.mix import MixedLoader
from scpretrain.data_loader.stream import StreamingLoader

__all__ = ["StreamingLoader", "MixedLoader", "model_inputs"]
