"""Progress that shows in a terminal and in a log file alike.

rich draws its live bars only on a terminal; written to a file or a pipe (nohup, SLURM, CI
logs) a bar appears once, at the end, and a long job looks stuck until then. `progress()`
returns rich's `Progress` on a terminal and otherwise `LineProgress`, which prints the same
figures as one plain line every `every_s` seconds and once at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import Progress

LOG_EVERY_S = 30.0


class LineProgress:
    """The part of rich's Progress API that minorsft uses, printed as periodic plain lines."""

    def __init__(self, console: Console, describe: Callable[[dict], str],
                 every_s: float = LOG_EVERY_S, disable: bool = False):
        self.console, self.describe = console, describe
        self.every_s, self.disable = every_s, disable
        self.tasks: dict[int, dict] = {}
        self.printed: dict[int, str] = {}  # the last line of each task (no repeat at the end)
        self.started = time.perf_counter()
        self.last_line = self.started

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        for task_id in self.tasks:
            self._print(task_id)

    def add_task(self, description: str, total: float | None = None, completed: float = 0,
                 **fields) -> int:
        task_id = len(self.tasks)
        self.tasks[task_id] = {"description": description, "total": total,
                               "completed": completed, **fields}
        return task_id

    def update(self, task_id: int, advance: float = 0, **fields) -> None:
        task = self.tasks[task_id]
        task["completed"] += advance
        task.update(fields)
        now = time.perf_counter()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            self._print(task_id)

    def _print(self, task_id: int) -> None:
        line = self.describe(self.tasks[task_id])
        if not self.disable and line != self.printed.get(task_id):
            self.printed[task_id] = line
            elapsed = time.perf_counter() - self.started
            self.console.print(f"{line}  [{elapsed:.0f} s]", highlight=False,
                               markup=False, soft_wrap=True)


def progress(console: Console, columns: tuple, describe: Callable[[dict], str],
             disable: bool = False, every_s: float = LOG_EVERY_S) -> Progress | LineProgress:
    """rich bars on a terminal, periodic lines (`describe(task fields)`) anywhere else."""
    if console.is_terminal or console.is_jupyter:
        return Progress(*columns, console=console, disable=disable, transient=False)
    return LineProgress(console, describe, every_s, disable)
