"""Streaming loader: exactly-once, resumable batches of CSR counts from Zarr shards or TileDB-SOMA.

Public API: ``StreamingLoader`` (the iterable of batches with ``state_dict``/``load_state_dict``)
and ``model_inputs`` (CSR batch -> model inputs on the device).
"""
from data_loader.collate import model_inputs
from data_loader.stream import StreamingLoader

__all__ = ["StreamingLoader", "model_inputs"]
