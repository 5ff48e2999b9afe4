"""A training run of many steps per trainer, each in a fresh process: minorsft's default step
against TRL's SFTTrainer on the same new rows, as a user's run meets them.

`gpu_check.py` section 5 runs every trainer in one process and reads its batches twice. Caches
that live as long as the process (compiled code, kernel plans and tuning, the allocator's
blocks) are then warm for every run after the first, and the second pass only ever meets
lengths seen before. Neither is what a user's run sees: one process, compiled once, and batches
whose packed lengths and answer counts are mostly new. So here each trainer runs in a child
process of its own, over `--steps` batches of fresh random rows (the same rows, in the same
order, for every trainer of a round; each round draws new ones), and the children alternate
(TRL first in odd rounds, minorsft first in even ones) so that a machine's drift hits both.

Reported per run: the first `--warmup` steps' seconds (compiling, first kernel plans), steady
tokens/s (the steps after them: tokens / seconds from the end of the warm-up to the end of the
run, host and device synchronised there), whole-run tokens/s (from before the first step, what
a run of `--steps` steps costs), and peak allocated memory; then each round's minorsft / TRL
ratio. The step-end times go to the JSON, so `--plot` can draw step time against step.

Tokens are every token of the batch's rows (prompt and answer), counted from the rows; TRL's
own collator count is checked against it. minorsft's step is `minorsft.train.train_step` on
rows held in memory (the CLI adds reading the cache and a metrics line per step); TRL's is
`SFTTrainer.train()` (its dataloader and callbacks included). Only TRL's timestamps are taken
without waiting for the GPU between steps, as it runs; `train_step` waits once a step for its
metrics, as `minorsft train` does.

    python benchmarks/gpu_long_run.py --out results --steps 150 --rounds 2
    python benchmarks/gpu_long_run.py --plot results/long_run.json -o long_run.png
    python benchmarks/gpu_long_run.py --device cpu --small --steps 6 --out smoke  # CPU smoke

Needs torch, transformers, minorsft and (for its TRL runs) trl with datasets.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

# name -> what the child builds: compiled ("default": as `train` decides for the device;
# "layers": decoder layers only, eager head blocks; "none": --no-compile), answer-position
# bucket for the head
MINORSFT_RUNS = {
    "minorsft": dict(compiled="default", bucket=0),
    "minorsft-bucketed": dict(compiled="default", bucket=256),
    "minorsft-eager-head": dict(compiled="layers", bucket=0),
    "minorsft-no-compile": dict(compiled="none", bucket=0),
}
TRAINERS = ("trl", *MINORSFT_RUNS)


def shape_settings(args) -> tuple[dict, int, int, int]:
    """(model sizes, batch, shortest and longest row) for the arguments."""
    import gpu_check

    if args.small:
        return gpu_check.SMALL, 2, 16, 48
    return gpu_check.SHAPES[args.shape], args.batch, args.min_len, args.max_len


def round_rows(args, round_index: int) -> list[dict]:
    """The round's rows: new ones each round, the same for every trainer of the round."""
    import gpu_check

    sizes, batch, min_len, max_len = shape_settings(args)
    return gpu_check.make_rows(batch * args.steps, min_len, max_len, sizes["vocab_size"],
                               seed=1000 + round_index)


def child(args) -> dict:
    """One trainer's run in this (fresh) process; returns its step-end times and peak."""
    import torch

    import gpu_check

    dev = gpu_check.Device(args.device)
    sizes, batch, _, max_len = shape_settings(args)
    dtype = torch.bfloat16 if dev.cuda else torch.float32
    rows = round_rows(args, args.round)
    batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]
    model = gpu_check.build_model(sizes, dtype, dev.device).train()
    dev.reset_peak()
    if args.child == "trl":
        ends, counted, synced = trl_run(args, dev, model, rows, batch, max_len, dtype)
    else:
        ends, counted, synced = minorsft_run(args, dev, model, batches, batch)
    return {"trainer": args.child, "round": args.round, "step_end_s": ends,
            "synced_s": synced, "counted_tokens": counted,
            "tokens": [sum(len(r["input_ids"]) for r in b) for b in batches],
            "peak_mib": dev.peak_mib(), "device": (torch.cuda.get_device_name() if dev.cuda
                                                   else "cpu"),
            "torch": torch.__version__}


def minorsft_run(args, dev, model, batches, batch):
    from minorsft.compiling import compile_decoder_layers, compile_model, compiles_by_default

    import gpu_check

    settings = MINORSFT_RUNS[args.child]
    gpu_check.set_attention(model, "segment")  # as `train` picks for an SDPA model
    if settings["compiled"] == "layers":
        compile_decoder_layers(model)
    elif settings["compiled"] == "default" and compiles_by_default(dev.device):
        compile_model(model)
    trainer = gpu_check.Trainer(model, batch, use_train_module=True)
    ends, counted, synced = [], [], {}
    with gpu_check.position_bucket(settings["bucket"] or None):
        started = time.perf_counter()
        for index, rows in enumerate(batches):
            counted.append(trainer.step("minorsft", True, rows)["tokens"])
            ends.append(time.perf_counter() - started)
            if index + 1 == args.warmup:
                dev.sync()
                synced["warmup_end"] = time.perf_counter() - started
        dev.sync()
        synced["end"] = time.perf_counter() - started
    return ends, counted, synced


def trl_run(args, dev, model, rows, batch, max_len, dtype):
    import torch
    from transformers import TrainerCallback

    import gpu_check
    from common import record_trl_steps

    if not gpu_check.trl_in_order():  # else its batches would not be minorsft's
        raise SystemExit("this TRL cannot read rows in order (no train_sampling_strategy)")
    sft = gpu_check.sft_trainer(dev, model, gpu_check.trl_dataset(rows), batch, max_len,
                                bf16=dtype == torch.bfloat16, compiled=False,
                                max_steps=args.steps)
    _, counted = record_trl_steps(sft)  # its collator's token count (no timer synchronising)
    ends, synced, clock = [], {}, {}

    class StepEnds(TrainerCallback):
        def on_train_begin(self, *unused, **kwargs):
            clock["start"] = time.perf_counter()

        def on_step_end(self, *unused, **kwargs):
            ends.append(time.perf_counter() - clock["start"])
            if len(ends) == args.warmup:
                dev.sync()
                synced["warmup_end"] = time.perf_counter() - clock["start"]

    sft.add_callback(StepEnds())
    sft.train()
    dev.sync()
    synced["end"] = time.perf_counter() - clock["start"]
    return ends, counted[:len(ends)], synced


def summarise(run: dict, warmup: int) -> dict:
    """Warm-up seconds, steady and whole-run tokens/s of one child's result."""
    tokens, ends, synced = run["tokens"], run["step_end_s"], run["synced_s"]
    steady_seconds = synced["end"] - synced["warmup_end"]
    steps = [b - a for a, b in zip([0.0, *ends], ends, strict=False)]
    return {"warmup_s": synced["warmup_end"],
            "steady_tok_s": sum(tokens[warmup:]) / steady_seconds,
            "whole_tok_s": sum(tokens) / synced["end"],
            "median_step_s": statistics.median(steps[warmup:]),
            "peak_mib": run["peak_mib"],
            "tokens_match": run["counted_tokens"] == tokens}


def report(runs: list[dict], warmup: int, unfinished: bool) -> str:
    """The Markdown table of the runs so far, with each round's minorsft / TRL ratios."""
    lines = ["| trainer | round | steps | first steps s | median step s | steady tokens/s | "
             "whole-run tokens/s | peak allocated MiB |", "|---|---|---|---|---|---|---|---|"]
    by_key = {}
    for run in runs:
        s = summarise(run, warmup)
        by_key[run["trainer"], run["round"]] = s
        lines.append(f"| {run['trainer']} | {run['round'] + 1} | {len(run['tokens'])} | "
                     f"{s['warmup_s']:.1f} ({warmup}) | {s['median_step_s']:.3f} | "
                     f"{s['steady_tok_s']:,.0f} | {s['whole_tok_s']:,.0f} | "
                     f"{s['peak_mib']:,.0f} |")
        if not s["tokens_match"]:
            lines[-1] += " tokens counted by the trainer differ from the rows' |"
    ratios = []
    for name in MINORSFT_RUNS:
        rounds = [r for (trainer, r) in by_key if trainer == name and ("trl", r) in by_key]
        steady = [by_key[name, r]["steady_tok_s"] / by_key["trl", r]["steady_tok_s"]
                  for r in rounds]
        whole = [by_key[name, r]["whole_tok_s"] / by_key["trl", r]["whole_tok_s"]
                 for r in rounds]
        if rounds:
            ratios.append(f"- {name} / trl, steady tokens/s: "
                          f"{', '.join(f'{a:.2f}' for a in steady)} (median "
                          f"{statistics.median(steady):.2f}); whole run: "
                          f"{', '.join(f'{b:.2f}' for b in whole)}")
    note = "\n_Unfinished: runs still to come._\n" if unfinished else ""
    return "\n".join(lines) + "\n\n" + "\n".join(ratios) + "\n" + note


def exit_on_sigterm() -> None:
    """A `timeout` around this script sends SIGTERM: exit through Python so that subprocess.run
    kills the running child too (it would go on holding the GPU while the next stage starts)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def parent(args) -> None:
    exit_on_sigterm()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trainers = args.trainers.split(",")
    if unknown := set(trainers) - set(TRAINERS):
        raise SystemExit(f"unknown --trainers {sorted(unknown)}; known: {list(TRAINERS)}")
    order = [(r, name) for r in range(args.rounds)
             for name in (trainers if r % 2 == 0 else trainers[::-1])]
    if args.once:  # the variants beyond the first minorsft run go in the first round only
        first_minorsft = next(n for n in trainers if n != "trl")
        order = [(r, n) for r, n in order if r == 0 or n in ("trl", first_minorsft)]
    runs = []
    header = (f"# minorsft vs TRL SFTTrainer, {args.steps} steps of batch "
              f"{shape_settings(args)[1]}, one fresh process per run\n\n")
    for position, (round_index, name) in enumerate(order):
        command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--round",
                   str(round_index), *args.passthrough]
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                              env={**os.environ, "TQDM_DISABLE": "1"})
        # its warnings and any TORCH_LOGS output (recompiles), kept beside the results
        (out / f"{name}_round{round_index + 1}.log").write_text(proc.stderr[-50_000:])
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            print(f"{name}, round {round_index + 1}: failed ({proc.returncode})", flush=True)
            continue
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}, round {round_index + 1}: {time.perf_counter() - started:.0f} s",
              flush=True)
        text = header + report(runs, args.warmup, position + 1 < len(order))
        (out / "long_run.md").write_text(text)
        (out / "long_run.json").write_text(json.dumps({"warmup": args.warmup, "runs": runs}))
    print(header + report(runs, args.warmup, False))


def plot(path: Path, out: Path) -> None:
    """Step time against step for every run in a long_run.json (rolling median of 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for run in data["runs"]:
        ends = run["step_end_s"]
        steps = [b - a for a, b in zip([0.0, *ends], ends, strict=False)]
        smooth = [statistics.median(steps[max(0, i - 4):i + 1]) for i in range(len(steps))]
        axes.plot(range(1, len(steps) + 1), smooth,
                  label=f"{run['trainer']}, round {run['round'] + 1}",
                  linestyle="-" if run["trainer"] == "trl" else "--")
    axes.set_yscale("log")
    axes.set_xlabel("optimizer step (every batch new)")
    axes.set_ylabel("seconds per step (rolling median of 5)")
    axes.set_title(f"{data['runs'][0]['device']}: one fresh process per run")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="toy sizes (CPU smoke test)")
    parser.add_argument("--shape", choices=("0.5b", "1.5b"), default="0.5b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-len", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5,
                        help="first steps reported apart (compiling), not in steady tokens/s")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trainers", default="trl,minorsft",
                        help=f"comma-separated, from {', '.join(TRAINERS)}")
    parser.add_argument("--once", action="store_true",
                        help="run minorsft variants after the first in the first round only")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per child")
    parser.add_argument("--out", default="long_run_out")
    parser.add_argument("--plot", type=Path, help="draw this long_run.json and exit")
    parser.add_argument("-o", "--output", type=Path, default=Path("long_run.png"))
    parser.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot, args.output)
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")
    if args.child:
        result = child(args)
        sys.stdout.write("\n" + json.dumps(result) + "\n")
        return None
    args.passthrough = [f"--device={args.device}", f"--shape={args.shape}",
                        f"--batch={args.batch}", f"--min-len={args.min_len}",
                        f"--max-len={args.max_len}", f"--steps={args.steps}",
                        f"--warmup={args.warmup}", *(["--small"] if args.small else [])]
    return parent(args)


if __name__ == "__main__":
    main()
