"""Run an iterator ahead of its consumer in a background thread (pass 1 of the build)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any


def read_ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Produce ``items`` in a background thread, up to ``depth`` ahead of the consumer.

    Reading and decoding a source block (h5py, TileDB, text parsing, numpy casts) overlaps
    with dealing and spooling the previous one; much of both runs without the GIL.
    Exceptions reach the consumer in order; closing the consumer stops the thread.
    """
    if depth < 1:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as exc:  # handed to the consumer, raised there
            q.put((done, exc))

    thread = threading.Thread(target=produce, name="sharding-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # drain so a blocked put wakes up and sees stop
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()
