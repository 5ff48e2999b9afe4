"""A lock on a folder that goes with its process: an flock on an empty file in it, released when
the process ends however it ends (kill -9 included), so that the next run never finds a stale
lock. Precompute holds one per shard of a cache, train one per --output."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def folder_lock(out: Path, name: str, wait: bool = True) -> Iterator[bool]:
    """Hold an flock on `out/name`, waiting for it or not; yields False if it was busy.

    Nothing is locked (True is yielded) where fcntl does not exist (Windows) or `out` is not a
    directory (a single-file cache about to be refused or replaced, a file given as a folder).
    """
    try:
        import fcntl
    except ImportError:
        yield True
        return
    if not out.is_dir():
        yield True
        return
    with (out / name).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
