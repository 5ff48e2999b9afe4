"""Progress in a log file: plain lines while the job runs, not one bar at the end."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from minorsft.progress import LineProgress, progress


def _describe(task):
    return f"work {task['completed']:.0f}/{task['total']} rate {task['rate']:.1f}"


def test_a_file_gets_periodic_lines_and_the_last_state_once():
    out = io.StringIO()
    console = Console(file=out, width=200)
    assert not console.is_terminal
    bar = progress(console, (), _describe, every_s=0.0)
    assert isinstance(bar, LineProgress)
    with bar:
        task = bar.add_task("work", total=3, rate=0.0)
        for step in range(3):
            bar.update(task, advance=1, rate=step * 1.5)
    lines = out.getvalue().splitlines()
    assert [line.split("  [")[0] for line in lines] == [
        "work 1/3 rate 0.0", "work 2/3 rate 1.5", "work 3/3 rate 3.0"]


def test_lines_are_spaced_in_time_and_can_be_off():
    out = io.StringIO()
    with progress(Console(file=out), (), _describe, every_s=3600.0) as bar:
        task = bar.add_task("work", total=5, rate=1.0)
        for _ in range(5):
            bar.update(task, advance=1)
    assert out.getvalue().splitlines()[0].startswith("work 5/5")  # only the final line
    assert len(out.getvalue().splitlines()) == 1
    out = io.StringIO()
    with progress(Console(file=out), (), _describe, disable=True, every_s=0.0) as bar:
        bar.update(bar.add_task("work", total=1, rate=1.0), advance=1)
    assert out.getvalue() == ""


def test_a_terminal_gets_rich_bars():
    console = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(progress(console, (), _describe), Progress)
