"""Training throughput and peak memory: minorsft train (sft, minorsft, packed, live reference)
vs TRL SFTTrainer, same rows, batch and optimizer; and MinorSFT vs raw SFT step time.

Each configuration runs in a fresh child process (so its memory peak is its own); the
configurations are interleaved round after round, because the machine may be shared. A child
loads its model, resets the resident high-water mark, runs `--steps` optimizer steps and
reports tokens/s over all steps but the first (warm-up) and the peak resident memory of the
training phase (`phase peak`) and of its whole life (`process peak`).

- sft / minorsft / minorsft padded: the real `minorsft.train.setup` + `train_step` on a cache
  written by `minorsft precompute`; sft and minorsft with the default packing (packed rows,
  per-sample attention), `minorsft padded` with `--no-packing`;
- minorsft+live-ref: the same, but a second copy of the model (the reference) is held beside the
  policy and scores every micro-batch under inference mode, as trainers without a cache do;
- the same two with ` (returning malloc)`: glibc's malloc set to hand freed blocks back at once
  (`common.RETURNING_MALLOC`), so that the peaks of the cache-vs-live-reference comparison
  count memory in use and not heap left over from earlier steps (slower; memory only);
- minorsft bf16-mixed / trl-sft bf16: both in bf16 autocast on fp32 weights (`--dtype
  bf16-mixed`; TRL's default `bf16=True`), which CPUs with bf16 instructions run faster;
- trl-sft: TRL's `SFTTrainer` (prompt-completion data, completion-only loss, its defaults
  except bf16=False and gradient checkpointing as set here, so that it runs in fp32 as the
  others do),
  tokens counted from its collator's attention mask; trl-sft padding-free: the same with
  `padding_free=True` (TRL's own packing of each batch into one row).

A last child runs raw SFT and MinorSFT steps alternately on the same batches in one process
(the fairest step-time comparison on a noisy machine). Usage:

    python benchmarks/bench_training.py --data gsm8k.jsonl --prompt-field question \
        --response-field answer --rows 48 --steps 4 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import (
    RETURNING_MALLOC,
    add_data_arguments,
    emit,
    machine,
    make_cache,
    median,
    peak_rss_mib,
    read_records,
    record_trl_steps,
    reset_peak_rss,
    rss_mib,
    run_child,
    table,
    to_chat,
    with_live_reference,
)

SCRIPT = Path(__file__).resolve()


PACKING = {"auto": None, "on": True, "off": False}


def _train_config(args, loss: str, packing: bool | None):
    from minorsft.train import TrainConfig

    return TrainConfig(cache=args.cache, output=tempfile.mkdtemp(prefix="bench-train-"),
                       loss=loss, lr=1e-5, batch_size=args.batch_size,
                       micro_batch_size=args.batch_size, max_steps=args.steps, shuffle=False,
                       warmup_ratio=0.0, dtype=args.dtype, device="cpu", packing=packing,
                       gradient_checkpointing=args.gradient_checkpointing)


def _batches(args):
    from minorsft.cache import iter_rows

    rows = list(iter_rows(Path(args.cache)))
    return [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]


def child_minorsft(args) -> dict:
    from rich.console import Console

    from minorsft.models import load_model
    from minorsft.train import setup, train_step

    config = _train_config(args, args.loss, PACKING[args.packing])
    state = setup(config, Console(stderr=True, quiet=True))
    reference, reference_mib = None, None
    if args.live_ref:
        reference = load_model(state.model_path, state.dtype, state.device).eval()
        reference.requires_grad_(False)
        reference_mib = sum(p.numel() * p.element_size() for p in reference.parameters()) / 2**20
    loaded_rss = rss_mib()
    reset = reset_peak_rss()
    times, tokens = [], []
    for step, rows in zip(range(args.steps), _batches(args), strict=False):
        started = time.perf_counter()
        if reference is not None:
            rows = with_live_reference(reference, rows, state.tokenizer.pad_token_id,
                                       state.device)
        metrics = train_step(state, config, rows)
        times.append(time.perf_counter() - started)
        tokens.append(metrics["tokens"])
        if step == 0:
            first_loss = metrics["loss"]
    return {"times": times, "tokens": tokens, "loaded_rss": loaded_rss, "reset": reset,
            "phase_peak": peak_rss_mib(), "first_loss": first_loss,
            "reference_mib": reference_mib}


def child_trl(args) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from minorsft.models import load_model, load_tokenizer, resolve_model

    model_path = resolve_model(args.model)
    tokenizer = load_tokenizer(model_path)
    rows = []
    for record in read_records(args.data, args.rows):
        prompt, completion = to_chat(record, args.prompt_field, args.response_field)
        rows.append({"prompt": prompt, "completion": completion})
    model = load_model(model_path, torch.float32, torch.device("cpu"))
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=
        args.batch_size, gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=1e-5,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=10_000, save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, seed=42, gradient_checkpointing=args.gradient_checkpointing,
        # fp32 like the fp32 rows here: TRL's default bf16=True runs the CPU matmuls under bf16
        # autocast, another precision (and a faster one on CPUs with AVX512-BF16); the
        # "trl-sft bf16" row keeps that default, against minorsft's bf16-mixed.
        bf16=args.trl_bf16,
        padding_free=args.padding_free,
        # TRL refuses max_length with padding_free; the rows are within it anyway.
        max_length=None if args.padding_free else args.max_length,
        # Read the rows in order, as minorsft does here: the same batches, the same padding.
        **({"train_sampling_strategy": "sequential"}
           if "train_sampling_strategy" in SFTConfig.__dataclass_fields__ else {}))
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    times, tokens = record_trl_steps(trainer)
    loaded_rss = rss_mib()
    reset = reset_peak_rss()
    trainer.train()
    # The dataloader may fetch one batch ahead; keep the counts of the steps that ran.
    return {"times": times, "tokens": tokens[:len(times)], "loaded_rss": loaded_rss,
            "reset": reset, "phase_peak": peak_rss_mib()}


def child_ab(args) -> dict:
    """Raw SFT and MinorSFT steps alternately, same model object, same batches."""
    from rich.console import Console

    from minorsft.train import setup, train_step

    configs = {loss: _train_config(args, loss, PACKING[args.packing])
               for loss in ("sft", "minorsft")}
    state = setup(configs["sft"], Console(stderr=True, quiet=True))
    batches = _batches(args)
    times = {"sft": [], "minorsft": []}
    for index in range(args.steps * 2):
        rows = batches[(index // 2) % len(batches)]
        loss = ("sft", "minorsft")[(index + index // 2) % 2]  # ABBA order cancels drift
        started = time.perf_counter()
        train_step(state, configs[loss], rows)
        times[loss].append(time.perf_counter() - started)
    return {"times": times}


CONFIGS = {
    "sft": ["--loss", "sft"],
    "minorsft": ["--loss", "minorsft"],
    "minorsft padded": ["--loss", "minorsft", "--packing", "off"],
    "minorsft+live-ref": ["--loss", "minorsft", "--live-ref"],
    "trl-sft": ["--trl"],
    "trl-sft padding-free": ["--trl", "--padding-free"],
    # bf16 autocast on fp32 weights, both sides: minorsft --dtype bf16-mixed, TRL's default bf16
    "minorsft bf16-mixed": ["--loss", "minorsft", "--dtype", "bf16-mixed"],
    "trl-sft bf16": ["--trl", "--trl-bf16"],
    # The cache-vs-live-reference comparison again, with freed memory returned to the system
    # at once (common.RETURNING_MALLOC): peaks that count memory in use, not heap left over.
    "minorsft (returning malloc)": ["--loss", "minorsft"],
    "minorsft+live-ref (returning malloc)": ["--loss", "minorsft", "--live-ref"],
}
CHILD_ENV = {"minorsft (returning malloc)": RETURNING_MALLOC,
             "minorsft+live-ref (returning malloc)": RETURNING_MALLOC}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_arguments(parser, rows=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--configs", default=",".join([*CONFIGS, "ab"]))
    parser.add_argument("--json", type=Path, help="also write every child's result here")
    parser.add_argument("--plot", type=Path,
                        help="also draw tokens/s and peak memory per configuration (PNG)")
    # child-only flags
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--loss", default="minorsft", help=argparse.SUPPRESS)
    parser.add_argument("--packing", choices=PACKING, default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--padding-free", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--live-ref", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trl", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--trl-bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--ab", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.manual_seed(0)
        result = child_trl(args) if args.trl else child_ab(args) if args.ab else \
            child_minorsft(args)
        result["process_peak"] = __import__("resource").getrusage(
            __import__("resource").RUSAGE_SELF).ru_maxrss / 1024
        emit(result)
        return

    workdir = Path(tempfile.mkdtemp(prefix="bench-training-"))
    cache = make_cache(args, workdir)
    common = ["--child", "--cache", cache, "--model", args.model, "--data", args.data,
              "--rows", str(args.rows), "--max-length", str(args.max_length),
              "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    if args.prompt_field:
        common += ["--prompt-field", args.prompt_field, "--response-field", args.response_field]
    if args.gradient_checkpointing:
        common.append("--gradient-checkpointing")
    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            extra = ["--ab"] if name == "ab" else CONFIGS[name]
            runs[name].append(run_child(SCRIPT, common + extra, env=CHILD_ENV.get(name)))
            print(f"  {name}: done in {runs[name][-1]['wall_s']:.0f} s", flush=True)

    print(f"\nTraining, batch {args.batch_size} x {args.steps} steps (first step excluded), "
          f"fp32 unless named, {args.rounds} interleaved rounds, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}\nmachine: {machine()}\n")
    rows = []
    summary = {}
    for name in names:
        if name == "ab":
            continue
        rates = [sum(r["tokens"][1:]) / sum(r["times"][1:]) for r in runs[name]]
        phase = max(r["phase_peak"] for r in runs[name])
        process = max(r["process_peak"] for r in runs[name])
        summary[name] = {"tok_s": median(rates), "phase": phase, "process": process}
        rows.append([name, " / ".join(f"{x:.0f}" for x in rates), median(rates),
                     median([r["loaded_rss"] for r in runs[name]]), phase, process])
    print(table(["config", "tokens/s per round", "tokens/s (median)", "RSS after load (MiB)",
                 "phase peak (MiB)", "process peak (MiB)"], rows))
    ratios = []
    pairs = [(name, baseline) for baseline in ("trl-sft", "trl-sft padding-free")
             for name in ("sft", "minorsft", "minorsft padded")]
    for name, baseline in [*pairs, ("minorsft bf16-mixed", "trl-sft bf16"),
                           ("minorsft bf16-mixed", "minorsft")]:
        if {name, baseline} <= summary.keys():
            target = ">= 1.2" if baseline.startswith("trl") else "(speed-up of bf16 autocast)"
            ratios.append([f"{name} tokens/s / {baseline} tokens/s",
                           summary[name]["tok_s"] / summary[baseline]["tok_s"], target])
    if {"sft", "minorsft"} <= summary.keys():
        ratios.append(["minorsft phase peak / sft phase peak",
                       summary["minorsft"]["phase"] / summary["sft"]["phase"], "<= 1.03"])
    for suffix in ("", " (returning malloc)"):
        cache, live = f"minorsft{suffix}", f"minorsft+live-ref{suffix}"
        if {cache, live} <= summary.keys():
            saved = summary[live]["process"] - summary[cache]["process"]
            weights = runs[live][0]["reference_mib"]  # as the live-reference child held them
            ratios.append([f"process peak saved by the cache{suffix} (MiB)", saved,
                           f">= reference weights ({weights:,.0f} MiB)"])
    if "ab" in runs:
        sft = [t for r in runs["ab"] for t in r["times"]["sft"][1:]]
        minor = [t for r in runs["ab"] for t in r["times"]["minorsft"][1:]]
        ratios.append([f"minorsft / sft step time (same process, ABBA, {len(sft)} steps each)",
                       median(minor) / median(sft), "<= 1.03"])
        # The same steps paired batch by batch: batches differ in size far more (here 3.8-6.3 s)
        # than the two losses do, and a ratio of medians can pair different batches.
        ratios.append(["minorsft / sft step time, median of per-batch ratios",
                       median([m / s for m, s in zip(minor, sft, strict=True)]), "<= 1.03"])
    if ratios:
        print()
        print(table(["ratio", "measured", "target"], ratios))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "settings": vars(args) | {
            "json": str(args.json), "plot": str(args.plot)}, "runs": runs, "ratios": ratios},
            indent=1, default=str))
    if args.plot:
        plot_training(runs, summary, args.plot, f"{machine()}; batch {args.batch_size} x "
                      f"{args.steps} steps, {args.rounds} rounds")


def plot_training(runs: dict, summary: dict, out: Path, subtitle: str) -> None:
    """Tokens/s (median bar, one dot per round) and process peak memory per configuration, with
    the issue's targets: 1.2 x TRL's tokens/s, and the cache's saving against a live reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in summary if not name.endswith("(returning malloc)")]
    colours = ["tab:grey" if name.startswith("trl") else "tab:green" for name in names]
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(13, 4.8))
    speed.barh(names, [summary[n]["tok_s"] for n in names], color=colours)
    for row, name in enumerate(names):
        rates = [sum(r["tokens"][1:]) / sum(r["times"][1:]) for r in runs[name]]
        speed.plot(rates, [row] * len(rates), "k.", markersize=4)
    for baseline, style in (("trl-sft", "--"), ("trl-sft padding-free", ":")):
        if baseline in summary:
            speed.axvline(1.2 * summary[baseline]["tok_s"], color="black", linestyle=style,
                          linewidth=1, label=f"target: 1.2 x {baseline}")
    speed.set_xlabel("training tokens/s (bar: median of rounds; dots: rounds)")
    speed.legend(fontsize=8, loc="lower right")
    speed.invert_yaxis()
    memory.barh(names, [summary[n]["process"] for n in names], color=colours)
    memory.set_xlabel("process peak resident memory (MiB)")
    cache, live = "minorsft (returning malloc)", "minorsft+live-ref (returning malloc)"
    if not {cache, live} <= summary.keys():
        cache, live = "minorsft", "minorsft+live-ref"
    if {cache, live} <= summary.keys():
        saved = summary[live]["process"] - summary[cache]["process"]
        memory.set_title(f"the cache saves {saved:,.0f} MiB against a live reference "
                         f"(its weights: {runs[live][0]['reference_mib']:,.0f} MiB; {cache})",
                         fontsize=8)
    memory.invert_yaxis()
    memory.set_yticklabels([])
    figure.suptitle(f"minorsft train (green) vs TRL SFTTrainer (grey)\n{subtitle}", fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
