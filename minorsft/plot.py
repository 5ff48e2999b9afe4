"""Training curves of several runs on shared axes: the paper's Figure 1, for your runs.

Each run folder written by `minorsft train` holds `metrics.jsonl` (one line per step) and
`run_config.json` (the loss and lr that label the curve). Draws with matplotlib (a core
dependency, no extra to install) and its Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from minorsft.heldout import EVAL_METRICS, read_records
from minorsft.jsonl import malformed_json_reason

# (metrics key, panel title). nll is the per-token answer NLL, comparable across losses; the
# losses themselves live on different scales (sft-dpo's starts at log 2).
PANELS = (
    ("m_theta", "m_theta (eq. 8): mean r/m"),
    ("nll", "answer NLL per token (batch)"),
    ("loss", "loss"),
    ("coefficient", "mean coefficient sigmoid(-beta r)"),
    ("reward", "mean reward beta r"),
    ("lr", "learning rate"),
)
# (eval_metrics.jsonl key, panel title): `train --eval-cache`'s held-out numbers, drawn where
# a run has them (they are measured every few steps, so their curves have fewer points).
HELDOUT_PANELS = (
    ("m_theta", "held-out m_theta (eq. 8)"),
    ("nll_per_token", "held-out answer NLL per token"),
)
LOSS_COLOURS = {"sft": "tab:blue", "sft-dpo": "tab:orange", "minorsft": "tab:green"}
LINESTYLES = ("-", "--", ":", "-.")
# From the fifth run of a loss on, a marker too: colour and line style alone repeated.
MARKERS = ("o", "s", "^", "x", "D")


def literal(text: str) -> str:
    """`text` as matplotlib draws it literally: `$` read as a formula's bounds (a title "costs
    $5 and $6" lost its dollars, an unbalanced one failed the plot), and a legend label that
    starts with `_` is left out of the legend (a run folder named `_scratch`)."""
    text = text.replace("$", r"\$")
    return "\N{ZERO WIDTH SPACE}" + text if text.startswith("_") else text


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell the runs apart
    (runs/a/minor and runs/b/minor become a/minor and b/minor)."""
    # abspath, not resolve: "." gets its real name, but a symlinked run keeps the name given.
    parts = [Path(os.path.abspath(run_dir)).parts for run_dir in run_dirs]
    names: list[str] = []
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = [Path(*p[-depth:]).as_posix() for p in parts]
        if len(set(names)) == len(names):
            break
    return names  # the same folder given twice stays ambiguous: it is the same run


class NoStepsYet(ValueError):
    """A run folder whose metrics.jsonl has no step yet (a run that has just started)."""


def read_run(run_dir: Path, name: str | None = None) -> tuple[str, list[dict], dict]:
    """(label, per-step metrics, config) of one run folder; a clear error if it is not one.

    The label is `name` (default: the folder's name) and the run's loss, lr, beta and LoRA rank:
    the values alone would label two runs of the same settings (other data, seed) alike.
    Lines of metrics.jsonl that do not parse are skipped with a warning on stderr.
    """
    run_dir = Path(run_dir)
    name = name or run_names([run_dir])[0]
    metrics_path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such folder")
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a `minorsft train` output)")
    rows = []
    # (bytes that are not UTF-8, a damaged disk's: their line is skipped below, not the file
    # refused with a decoding error that named no file)
    with metrics_path.open(encoding="utf-8", errors="replace") as handle:
        for line_no, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                problem = malformed_json_reason(error, text.rstrip("\r\n"))
            else:
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    rows.append(row)
                    continue
                problem = "not a step's metrics"
            # a run killed mid-write can leave a truncated last line: skip it, keep the rest
            print(f"warning: {metrics_path}:{line_no}: skipped ({problem})", file=sys.stderr)
    if not rows:
        raise NoStepsYet(f"{metrics_path}: no steps logged")
    config: dict = {}
    config_path = run_dir / "run_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))["config"]
            if not isinstance(config, dict):
                raise TypeError("its config is not an object")
        except (OSError, ValueError, KeyError, TypeError) as error:
            # one damaged file should not stop the plot of every run given with it
            print(f"warning: {config_path}: unreadable ({error}); the run is drawn without its "
                  "settings", file=sys.stderr)
            config = {}
    label = name
    if "loss" in config and "lr" in config:
        # beta scales the coefficient and reward panels for every loss, sft included
        label += f": {config['loss']} lr={config['lr']:g} beta={config.get('beta', 0.04):g}"
        if config.get("lora_r"):
            label += f" LoRA r={config['lora_r']}"
    else:  # running, or stopped (run_config.json is written at the end): loss not known yet
        label += " (unfinished)"
    return label, rows, config


def plot_runs(run_dirs: list[Path], out: Path, title: str | None = None) -> Path:
    """Draw the six panels for every run into one PNG at `out`, and two of held-out numbers
    where a run has them; returns the path written.

    An `out` without an extension gets `.png`, as matplotlib would add it.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs, empty, heldout = [], [], []
    for run_dir, name in zip(run_dirs, run_names(run_dirs), strict=True):
        try:
            runs.append(read_run(Path(run_dir), name))
            heldout.append(read_records(Path(run_dir) / EVAL_METRICS))
        except NoStepsYet as error:  # a run that has just started: plot the others
            empty.append(error)
    if not runs:
        raise empty[0]
    for error in empty:
        print(f"warning: {error}; its run is left out", file=sys.stderr)
    panels = [(key, title, False) for key, title in PANELS]
    if any(heldout):
        panels[5:5] = [(key, title, True) for key, title in HELDOUT_PANELS]
    columns = len(panels) // 2
    figure, axes = plt.subplots(2, columns, figsize=(13 * columns / 3, 7), sharex=True)
    style_index: dict[str, int] = {}
    for (label, rows, config), records in zip(runs, heldout, strict=True):
        loss = config.get("loss")
        # grey for a run whose loss is not known yet: matplotlib's default blue and orange
        # would pass it off as an sft or sft-dpo run
        colour = LOSS_COLOURS.get(loss, "tab:gray")
        # Runs of the same loss share a colour; their lrs differ by line style, and from the
        # fifth on by a marker too.
        index = style_index.get(loss, 0)
        style_index[loss] = index + 1
        linestyle = LINESTYLES[index % len(LINESTYLES)]
        marker = MARKERS[(index // len(LINESTYLES) - 1) % len(MARKERS)] \
            if index >= len(LINESTYLES) else None
        for axis, (key, _, held) in zip(axes.flat, panels, strict=True):
            series = records if held else rows
            if not series:
                continue
            steps = [row["step"] for row in series]
            # (json_safe wrote a value that was not finite as null)
            values = [float("nan") if row.get(key) is None else row[key] for row in series]
            axis.plot(steps, values, label=literal(label), color=colour, linestyle=linestyle,
                      marker=marker or ("." if len(steps) < 40 else None),
                      markevery=max(1, len(steps) // 12) if marker else None)
    for axis, (key, panel_title, _) in zip(axes.flat, panels, strict=True):
        axis.set_title(panel_title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no tick at 0.5
        if key == "m_theta":
            axis.axhline(0.0, color="grey", linewidth=0.8)
    for axis in axes[1]:
        axis.set_xlabel("optimizer step")
    # One legend under the panels: inside the m_theta panel it covered the curves.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    legend_columns = min(len(labels), 3)
    rows = math.ceil(len(labels) / legend_columns)
    figure.legend(handles, labels, loc="lower center", ncol=legend_columns, fontsize=8,
                  frameon=False)
    if title:
        figure.suptitle(literal(title))
    # (the legend's rows of 8-point text, in figure fractions of the 7-inch height)
    figure.tight_layout(rect=(0, min(0.5, 0.01 + rows * 0.033), 1, 1))
    out = Path(out)
    if not (extension := os.path.splitext(str(out))[1][1:]):
        out = Path(str(out).rstrip(".") + ".png")  # what savefig would write: report that
    elif extension.lower() not in (kinds := figure.canvas.get_supported_filetypes()):
        plt.close(figure)  # (matplotlib's own message did not name the option)
        raise ValueError(f"-o {out}: .{extension} is no picture format matplotlib writes; "
                         f"use one of {', '.join('.' + kind for kind in sorted(kinds))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return out
