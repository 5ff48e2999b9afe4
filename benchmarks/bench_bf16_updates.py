"""bf16 training with and without fp32 master weights, against fp32: do the updates land?

Trains the same model from the same cache, rows and order three times with `minorsft.train`
(MinorSFT, the paper's lr 2e-5, no warm-up): in fp32, in bf16 with fp32 master weights (the
default for bf16 models) and in pure bf16 (`--no-master-weights`). It reports, after the last
step, how far each run's weights moved from the start compared with the fp32 run's movement
(norm ratio and cosine of the two weight changes, over all parameters), the share of weight
elements that changed at all, and the training loss of each step (`--plot`: as a figure).
Usage:

    python benchmarks/bench_bf16_updates.py --data gsm8k.jsonl --prompt-field question \
        --response-field answer --rows 64 --steps 16 --plot docs/bf16_updates.png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import add_data_arguments, machine, make_cache, table

MODES = {"fp32": ("float32", True), "bf16 + fp32 master weights": ("bfloat16", True),
         "pure bf16": ("bfloat16", False)}


def train(args, cache: str, dtype: str, master_weights: bool):
    """Weights before and after `args.steps` steps (fp32 copies, by name) and each step's loss."""
    from rich.console import Console

    from minorsft.cache import iter_rows
    from minorsft.train import TrainConfig, setup, train_step

    config = TrainConfig(cache=cache, output=tempfile.mkdtemp(prefix="bench-bf16-"),
                         loss="minorsft", lr=args.lr, batch_size=args.batch_size,
                         micro_batch_size=args.batch_size, max_steps=args.steps, shuffle=False,
                         warmup_ratio=0.0, dtype=dtype, device="cpu", step0_check=False,
                         master_weights=master_weights)
    torch.manual_seed(0)
    state = setup(config, Console(stderr=True, quiet=True))
    before = {n: p.detach().float().clone() for n, p in state.model.named_parameters()}
    rows = list(iter_rows(Path(cache)))
    losses = []
    for step in range(args.steps):
        start = (step * args.batch_size) % len(rows)
        losses.append(train_step(state, config, rows[start:start + args.batch_size])["loss"])
    after = {n: p.detach().float().clone() for n, p in state.model.named_parameters()}
    return before, after, losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(parser, rows=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--plot", help="write the loss curves to this PNG (needs matplotlib)")
    args = parser.parse_args()
    cache = make_cache(args, Path(tempfile.mkdtemp(prefix="bench-bf16-")))
    runs = {name: train(args, cache, *settings) for name, settings in MODES.items()}

    def flat(weights):  # float64: sums over 10^8 elements
        return torch.cat([w.flatten() for w in weights.values()]).double()

    start, fp32_end, _ = runs["fp32"]
    fp32_change = flat(fp32_end) - flat(start)
    rows = []
    for name, (before, after, losses) in runs.items():
        change = flat(after) - flat(before)
        cosine = torch.nn.functional.cosine_similarity(change, fp32_change, dim=0).item()
        changed = (flat(after) != flat(before)).float().mean().item()
        rows.append([name, f"{change.norm() / fp32_change.norm():.3f}", f"{cosine:.3f}",
                     f"{changed:.1%}", " ".join(f"{x:.4f}" for x in losses)])
    print(f"\nMinorSFT, lr {args.lr}, batch {args.batch_size} x {args.steps} steps, no warm-up, "
          f"same rows in order\nmachine: {machine()}\n")
    print(table(["run", "|weight change| / fp32's", "cosine with fp32's change",
                 "weight elements changed", "loss per step"], rows))
    if args.plot:
        plot(runs, args)


def plot(runs: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for name, (_, _, losses) in runs.items():
        axes.plot(range(1, len(losses) + 1), losses, marker="o", label=name)
    axes.set_xlabel("optimizer step (each on new rows)")
    axes.set_ylabel("MinorSFT loss of the step's batch")
    axes.set_title(f"SmolLM2-135M, MinorSFT at lr {args.lr}: bf16 updates with and without "
                   "fp32 master weights", fontsize=9)
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
