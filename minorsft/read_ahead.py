"""Run an iterator in a background thread, a bounded number of items ahead of its consumer.

Precompute reads and tokenizes rows (Jinja rendering and the tokenizer: one CPU core) and scores
them (the GPU) one after the other; on a GPU scoring waits in CUDA calls that release the GIL,
so tokenizing the next window of rows meanwhile hides most of the tokenizing time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


def read_ahead(items: Iterable[T], depth: int) -> Iterator[T]:
    """The items of `items`, in order, produced by a background thread that runs at most
    `depth` items ahead. An exception raised by `items` is raised here, where its item would
    have come. Closing this generator (or dropping it: Python closes it when collected) stops
    the thread at its next item, after the one it is making, and closes `items` there; up to
    `depth` items wait in memory meanwhile."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stopped = threading.Event()

    def put(entry: tuple[bool, object]) -> bool:
        while not stopped.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as error:  # handed to the consumer, raised there
            put((False, error))
        finally:  # a generator's own clean-up (worker processes) runs now, not when collected
            if close := getattr(iterator, "close", None):
                close()

    thread = threading.Thread(target=produce, name="minorsft-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = handoff.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stopped.set()
        thread.join()
