"""Check, render and tokenize rows in worker processes (`precompute --tokenize-workers`).

The chat template renders in Python, a row at a time, on one core: about 0.35 ms for a GSM8K
row and far more for a multi-turn chat, each of whose assistant turns is rendered several
times (`answer_spans._answer_span`). On a GPU that one core can fall behind the scoring engine.
Here batches of rows go to processes of their own and come back in order: the items are those
`data.classify_rows` gives in one process (tested). What needs the input in order (row ids
and their repeats) stays in the process that reads it.

The workers are forked when the pool is made, before the scoring engine exists (no CUDA, no
vLLM processes, no threads yet), so each starts in milliseconds with the loaded tokenizer;
"spawn" would import torch and transformers again in each (seconds). Where fork does not
exist, they are spawned.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor

from minorsft.answer_spans import special_token_pattern
from minorsft.data import Batch, Example, FieldSpec, Rejection, render_and_tokenize

# Batches a worker has queued beyond the one it works on: enough that it never waits for the
# reader, few enough that a stop does not wait for much (each batch is TOKENIZE_BATCH_ROWS rows).
QUEUED_PER_WORKER = 2
MAX_AUTO_WORKERS = 8
PARENT_CHECK_S = 0.5
TOKENIZERS_PARALLELISM = "TOKENIZERS_PARALLELISM"  # (the tokenizers library's switch)


def auto_workers(on_gpu: bool) -> int:
    """Workers for `precompute` without `--tokenize-workers`: none on the CPU, where scoring
    takes over 99 % of the time and every core (docs/performance.md 6c); on a GPU half of this
    process's cores, at most MAX_AUTO_WORKERS. More workers cost no CPU time when tokenizing
    keeps up: each has at most 1 + QUEUED_PER_WORKER batches, and the read-ahead takes no more
    rows than it holds; they only raise how fast it can go when it falls behind."""
    if not on_gpu:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(MAX_AUTO_WORKERS, (cores or 1) // 2)


class RowWorkers:
    """`count` processes that check, render and tokenize batches of rows with `tokenizer`
    (`data.render_and_tokenize`). Make them before anything starts threads or CUDA, and before
    opening files they should not hold (a lock); close them (or use as a context manager)."""

    def __init__(self, count: int, tokenizer):
        if count < 1:
            raise ValueError(f"--tokenize-workers must be at least 1 here, got {count}")
        self.count, self.tokenizer = count, tokenizer
        # (fork only on Linux: on macOS it is unsafe with system frameworks loaded)
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        self._stop = context.Event()  # set while a stopped reader waits for its batches
        self._pool = ProcessPoolExecutor(count, mp_context=context, initializer=_start_worker,
                                         initargs=(tokenizer, os.getpid(), self._stop))
        # The workers encode on one thread each: the tokenizer's thread pool does not survive
        # a fork (it would hang), and the workers are several already. Set while they fork,
        # so that they inherit it (the tokenizer library then has no warning to print), and
        # put back for this process.
        given = os.environ.get(TOKENIZERS_PARALLELISM)
        os.environ[TOKENIZERS_PARALLELISM] = "false"
        try:
            # Processes start at the first task (all of them, for fork): start them now, while
            # this process is as bare as it will be.
            self._pool.submit(int).result()
        except BaseException:  # (a fork refused, Ctrl-C): no worker is left behind
            self._abandon()
            raise
        finally:
            if given is None:
                del os.environ[TOKENIZERS_PARALLELISM]
            else:
                os.environ[TOKENIZERS_PARALLELISM] = given

    def run(self, batches: Iterable[Batch], spec: FieldSpec, max_length: int | None,
            ) -> Iterator[tuple[int, Example | Rejection | None]]:
        """`data.render_and_tokenize` of each batch, in order. An error reading `batches` (a
        file cut off) comes after the items of the batches before it; an error in a batch
        comes where its items would have, with nothing after it. Closing this generator waits
        for the batches the workers are on and drops the others."""
        in_flight: deque[Future] = deque()
        batches = iter(batches)
        unreadable: Exception | None = None
        try:
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except Exception as error:  # the input's own: what was read before it first
                    unreadable = error
                    break
                in_flight.append(self._pool.submit(_work, batch, spec, max_length))
                if len(in_flight) > self.count * (1 + QUEUED_PER_WORKER):
                    yield from in_flight.popleft().result()
            while in_flight:
                yield from in_flight.popleft().result()
            if unreadable is not None:
                raise unreadable
        finally:
            if in_flight:  # stopped early, or a batch failed: the rest is not wanted
                self._stop.set()  # (batches already handed to a worker end at once)
                for future in in_flight:
                    future.cancel()
                for future in in_flight:
                    if not future.cancelled():
                        future.exception()
                self._stop.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _abandon(self) -> None:
        """Stop the workers that did start, where the pool could not be made whole."""
        # (the pool's processes first: shutting down forgets them)
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=5)

    def __enter__(self) -> RowWorkers:
        return self

    def __exit__(self, *_) -> None:
        self.close()


_worker: dict = {}


def _start_worker(tokenizer, parent: int, stop) -> None:
    # Ctrl-C reaches every process of the terminal's group: the parent stops the pool; a
    # worker's own KeyboardInterrupt would only print a traceback and break the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(tokenizer=tokenizer, special=special_token_pattern(tokenizer), stop=stop)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True,
                     name="minorsft-parent-watch").start()


def _exit_with_parent(parent: int) -> None:
    """End this worker once its parent is gone. A parent killed (kill -9, a scheduler's time
    limit) cannot stop its pool, and its workers would otherwise wait for work forever."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)


def _work(batch: Batch, spec: FieldSpec, max_length: int | None,
          ) -> list[tuple[int, Example | Rejection | None]]:
    if _worker["stop"].is_set():  # the reader stopped: nobody takes these rows
        return []
    try:
        return list(render_and_tokenize(batch, _worker["tokenizer"], spec, _worker["special"],
                                        max_length))
    except Exception as error:
        # An error the parent could not rebuild (an exception whose arguments are not its
        # constructor's) would reach it as a broken pool, its message lost: send its text.
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:
            raise RuntimeError(f"{type(error).__name__}: {error}\n"
                               f"{traceback.format_exc()}") from None
        raise
