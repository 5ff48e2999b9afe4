"""The background reader precompute tokenizes with: order, errors, early stops, bounded depth."""

import threading
import time

import pytest

from minorsft.read_ahead import read_ahead


def reader_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "minorsft-read-ahead"]


def test_items_come_in_order_and_the_thread_ends():
    assert list(read_ahead(iter(range(1000)), depth=7)) == list(range(1000))
    assert reader_threads() == []


def test_an_error_is_raised_where_its_item_would_have_come():
    def items():
        yield 1
        yield 2
        raise ValueError("row 3 is bad")

    got = []
    with pytest.raises(ValueError, match="row 3 is bad"):
        for item in read_ahead(items(), depth=4):
            got.append(item)
    assert got == [1, 2]


def test_the_thread_runs_at_most_depth_items_ahead_and_stops_with_the_consumer():
    produced = []

    def items():
        for number in range(100):
            produced.append(number)
            yield number

    reader = read_ahead(items(), depth=3)
    assert next(reader) == 0
    assert len(reader_threads()) == 1
    time.sleep(0.3)  # time to run ahead as far as it may
    # 0 taken, 3 waiting in the queue, one more produced and waiting to be put
    assert len(produced) <= 5
    reader.close()  # as precompute does when a row stops the run
    assert reader_threads() == []
    assert len(produced) <= 5


def test_closing_the_reader_closes_the_iterator_in_its_thread():
    """So that a generator's clean-up (precompute's worker processes) runs when the reader
    stops, not whenever the generator is collected."""
    cleaned_up = []

    def items():
        try:
            yield from range(100)
        finally:
            cleaned_up.append(threading.current_thread().name)

    reader = read_ahead(items(), depth=2)
    assert next(reader) == 0
    reader.close()
    assert cleaned_up == ["minorsft-read-ahead"]


def test_work_overlaps_with_the_consumer():
    """Each item takes 50 ms to make and 50 ms to use: one after the other at least 2 s for 20
    items, overlapped ~1 s (sleep releases the GIL, as waiting for CUDA does)."""
    def slow_items():
        for number in range(20):
            time.sleep(0.05)
            yield number

    started = time.perf_counter()
    for _ in read_ahead(slow_items(), depth=4):
        time.sleep(0.05)
    assert time.perf_counter() - started < 1.6
    with pytest.raises(ValueError, match="depth must be at least 1"):
        next(read_ahead(iter([]), depth=0))
