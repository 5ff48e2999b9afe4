"""Picture of `gpu_check.py` section 5: each minorsft configuration's tokens/s over TRL's.

One panel per `gpu_check.json` given (say, one run at each model shape), one pair of bars per
minorsft configuration (sequence lengths new, and seen before), the issue's target (1.2 x TRL
SFTTrainer) as a dashed line. The ratios are computed from the table's own tokens/s columns,
against TRL run on the same weights dtype as in the table's ratio rows. Usage:

    python benchmarks/plot_gpu_check.py results/gpu_check.json [more.json ...] -o gpu_trl.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGET = 1.2
PARTS = ("new shapes", "seen shapes")


def section5(results: dict, source: Path) -> tuple[str, dict[str, dict[str, float]]]:
    """(panel title, {trainer: {part: tokens/s}}) from one gpu_check.json."""
    titles = [title for title in results if title.startswith("5. ")]
    if not titles:
        raise SystemExit(f"{source}: no section 5 (run gpu_check.py with --sections trl)")
    rates: dict[str, dict[str, float]] = {}
    for row in results[titles[0]]:
        name, _, part = str(row[0]).rpartition(", ")
        if part in PARTS:
            rates.setdefault(name, {})[part] = float(str(row[3]).replace(",", ""))
    env = results.get("env", {})
    model = env.get("model", {})
    shape = (f"{model.get('num_hidden_layers')} layers x {model.get('hidden_size')}"
             if model else "")
    return f"{env.get('device', '?')}, {shape}, {env.get('dtype', '')}", rates


def baseline_for(name: str, trainers: list[str]) -> str:
    """TRL on fp32 weights for minorsft's bf16-mixed row; TRL's default run for the others."""
    trl = [t for t in trainers if t.startswith("trl")]
    if "bf16-mixed" in name:
        return next((t for t in trl if "fp32 weights" in t), trl[0])
    return next(t for t in trl if "fp32 weights" not in t)


def short(name: str) -> str:
    return name.split(" (")[0].removeprefix("minorsft").strip(" ,") or "default"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="gpu_check.json files")
    parser.add_argument("-o", "--output", type=Path, default=Path("gpu_trl.png"))
    parser.add_argument("--labels", help="comma-separated, one per JSON: put before its title")
    parser.add_argument("--columns", type=int, help="panels per row (default: all in one row)")
    args = parser.parse_args()
    labels = args.labels.split(",") if args.labels else [""] * len(args.results)
    if len(labels) != len(args.results):
        parser.error(f"--labels gives {len(labels)} labels for {len(args.results)} JSON files")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [section5(json.loads(path.read_text()), path) for path in args.results]
    columns = min(args.columns or len(panels), len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.5 * rows),
                                squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    for axis, label, (title, rates) in zip(axes.flat, labels, panels, strict=False):
        trainers = list(rates)
        ours = [t for t in trainers if not t.startswith("trl")]
        width = 0.38
        for offset, part in enumerate(PARTS):
            ratios = [rates[t][part] / rates[baseline_for(t, trainers)][part] for t in ours]
            bars = axis.bar([i + (offset - 0.5) * width for i in range(len(ours))], ratios,
                            width, label=f"lengths {part.split()[0]}")
            axis.bar_label(bars, fmt="%.2f", fontsize=8)
        axis.axhline(TARGET, color="black", linestyle="--", linewidth=1,
                     label=f"target {TARGET} x TRL")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xticks(range(len(ours)), [short(t) for t in ours], rotation=20, ha="right",
                        fontsize=8)
        axis.set_ylabel("tokens/s / TRL SFTTrainer's")
        axis.set_title(f"{label}: {title}" if label else title, fontsize=9)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
