"""A small-scale replication of the paper's comparison (arXiv 2408.10642, section 4).

Trains raw SFT, SFT-using-DPO and MinorSFT over a learning-rate grid on GSM8K rows, then
evaluates the base model and every run on held-out GSM8K answers (NLL per token, m_theta against
the base) and on MMLU questions with the paper's multiple-choice prompt. Writes
`results.json`, `results.md`, `curves.png` (training curves, the paper's Figure 1) and
`summary.png` (held-out metrics against lr, the paper's Figure 2) into --out, and each run's
`eval --per-item` lines, from which MinorSFT is compared with each other loss answer by answer
and question by question (sign test, McNemar) in results.md.

Get the data yourself (the project ships none): GSM8K from https://github.com/openai/grade-school-math
(`grade_school_math/data/{train,test}.jsonl`, MIT), MMLU from https://github.com/hendrycks/test
(`data/test/<subject>_test.csv`, MIT). Example:

    python experiments/replicate.py --gsm8k-train gsm8k/train.jsonl --gsm8k-test gsm8k/test.jsonl \
        --mmlu mmlu/global_facts_test.csv --mmlu mmlu/high_school_geography_test.csv --out rep/

Re-running with the same --out resumes: runs whose eval.json exists are not trained again.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

from rich.console import Console

from minorsft.eval import EvalConfig, run_eval
from minorsft.plot import plot_runs
from minorsft.precompute import PrecomputeConfig, run_precompute
from minorsft.train import TrainConfig, run_train

LOSSES = ("sft", "sft-dpo", "minorsft")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gsm8k-train", type=Path, required=True, help="GSM8K train.jsonl")
    parser.add_argument("--gsm8k-test", type=Path, required=True, help="GSM8K test.jsonl")
    parser.add_argument("--mmlu", type=Path, action="append", default=[],
                        help="an MMLU subject CSV (repeat for several)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--train-rows", type=int, default=128)
    parser.add_argument("--heldout-rows", type=int, default=64)
    parser.add_argument("--mmlu-per-file", type=int, default=25)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-5],
                        help="peak lrs, in the order they are run")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each run's weights (about 0.5 GB each for SmolLM2-135M)")
    return parser.parse_args(argv)


def take_rows(source: Path, target: Path, count: int, prefix: str) -> Path:
    """The first `count` rows of a GSM8K file, with stable ids."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open(encoding="utf-8") as handle, target.open("w", encoding="utf-8") as out:
        written = 0
        for line in handle:
            if written == count:
                break
            if line.strip():
                row = json.loads(line)
                out.write(json.dumps({"id": f"{prefix}-{written}", "question": row["question"],
                                      "answer": row["answer"]}) + "\n")
                written += 1
    if written < count:
        raise SystemExit(f"{source}: only {written} rows, asked for {count}")
    return target


def evaluate(model: str, args, heldout_cache: Path, console: Console, items: Path) -> dict:
    return run_eval(EvalConfig(model=model, reference=str(heldout_cache),
                               choices=[str(p) for p in args.mmlu],
                               max_questions=args.mmlu_per_file, dtype="float32",
                               per_item=str(items)), console)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of `wins` against `losses` at even odds (ties left out):
    the sign test, and McNemar's exact test on discordant pairs."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def read_items(path: Path) -> dict:
    """`eval --per-item` lines of one run, keyed (kind, file, id)."""
    if not path.exists():  # a run evaluated before the sweep wrote per-item files
        return {}
    items = [json.loads(line) for line in path.read_text().splitlines()]
    return {(item["kind"], item.get("file"), item["id"]): item for item in items}


def paired_row(name: str, ours: dict, theirs: dict) -> dict | None:
    """Run `ours` against run `theirs` on the same held-out answers and questions: on how many
    answers its r/m is the lower (it moved less from the base there), and the questions one
    got right and the other not."""
    held = [(ours[key]["r_per_token"], theirs[key]["r_per_token"])
            for key in ours if key[0] == "heldout" and key in theirs]
    asked = [(ours[key]["correct"], theirs[key]["correct"])
             for key in ours if key[0] == "choice" and key in theirs]
    if not held:
        return None
    lower = sum(a < b for a, b in held)
    higher = sum(a > b for a, b in held)
    only_ours = sum(a and not b for a, b in asked)
    only_theirs = sum(b and not a for a, b in asked)
    return {"pair": name, "heldout": len(held), "r_lower": lower, "r_higher": higher,
            "mean_r_difference": sum(a - b for a, b in held) / len(held),
            "r_sign_test_p": sign_test(lower, higher), "questions": len(asked),
            "only_ours_right": only_ours, "only_theirs_right": only_theirs,
            "mcnemar_p": sign_test(only_ours, only_theirs)}


def paired_rows(out: Path, lrs: list[float]) -> list[dict]:
    """MinorSFT against each other loss at each lr, answer by answer and question by question."""
    rows = []
    for lr in lrs:
        items = {loss: read_items(out / "runs" / f"{loss}-lr{lr:g}" / "items.jsonl")
                 for loss in LOSSES}
        for other in ("sft", "sft-dpo"):
            row = paired_row(f"minorsft vs {other}, lr {lr:g}", items["minorsft"], items[other])
            if row is not None:
                rows.append(row)
    return rows


def summary_row(name: str, loss: str | None, lr: float | None, result: dict,
                history: list[dict] | None, seconds: float | None) -> dict:
    held = result["heldout"]
    row = {"run": name, "loss": loss or "base", "lr": lr,
           "heldout_nll_per_token": held["nll_per_token"], "heldout_m_theta": held["m_theta"],
           "train_steps": len(history) if history else 0,
           "train_final_m_theta": history[-1]["m_theta"] if history else None,
           "train_final_coefficient": history[-1]["coefficient"] if history else None,
           "train_seconds": seconds}
    if choices := result.get("choices"):
        overall = choices["overall"]
        row.update(mmlu_accuracy=overall["accuracy"], mmlu_questions=overall["questions"],
                   mmlu_correct=overall["correct"], mmlu_letter_mass=overall["letter_mass"])
    return row


def write_table(rows: list[dict], path: Path, meta: dict, paired: list[dict] = ()) -> None:
    lines = [
        "| run | loss | lr | held-out NLL/token | held-out m_theta vs base | MMLU acc "
        "(± s.e.) | letter mass | final train coef. | train time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lr = f"{row['lr']:g}" if row["lr"] is not None else "-"
        if "mmlu_accuracy" in row:
            acc, n = row["mmlu_accuracy"], row["mmlu_questions"]
            mmlu = f"{acc:.3f} ± {math.sqrt(acc * (1 - acc) / n):.3f} ({row['mmlu_correct']}/{n})"
            mass = f"{row['mmlu_letter_mass']:.3f}"
        else:
            mmlu = mass = "-"
        coef = (f"{row['train_final_coefficient']:.3f}"
                if row["train_final_coefficient"] is not None else "-")
        seconds = f"{row['train_seconds'] / 60:.1f} min" if row["train_seconds"] else "-"
        lines.append(f"| {row['run']} | {row['loss']} | {lr} | "
                     f"{row['heldout_nll_per_token']:.4f} | {row['heldout_m_theta']:+.4f} | "
                     f"{mmlu} | {mass} | {coef} | {seconds} |")
    if paired:
        lines += [
            "", "Paired, answer by answer (r/m against the base: lower = moved less) and "
            "question by question (two-sided exact sign test / McNemar):", "",
            "| pair | r/m lower for MinorSFT | higher | mean difference of r/m | sign test p | "
            "right only with MinorSFT | right only with the other | McNemar p |",
            "|---|---|---|---|---|---|---|---|"]
        for row in paired:
            lines.append(
                f"| {row['pair']} | {row['r_lower']} of {row['heldout']} | {row['r_higher']} | "
                f"{row['mean_r_difference']:+.4f} | {row['r_sign_test_p']:.3g} | "
                f"{row['only_ours_right']} of {row['questions']} | {row['only_theirs_right']} | "
                f"{row['mcnemar_p']:.3g} |")
    lines.append("")
    lines.append(f"Settings: {json.dumps(meta)}")
    path.write_text("\n".join(lines) + "\n")


def plot_summary(rows: list[dict], path: Path) -> None:
    """Held-out NLL, m_theta and MMLU accuracy against lr, one line per loss, base dashed; and
    m_theta against NLL (each loss's runs joined in lr order): whether a loss deviates less
    for what it learns, or only learns less."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minorsft.plot import LOSS_COLOURS

    keys = [("heldout_nll_per_token", "held-out GSM8K NLL / token"),
            ("heldout_m_theta", "held-out m_theta vs base"),
            ("mmlu_accuracy", "MMLU subset accuracy")]
    figure, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    base = next((r for r in rows if r["loss"] == "base"), None)
    for axis, (key, title) in zip(axes, keys, strict=False):
        for loss in LOSSES:
            points = sorted((r["lr"], r[key]) for r in rows if r["loss"] == loss and key in r)
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=loss,
                          color=LOSS_COLOURS[loss])
        if base is not None and key in base:
            axis.axhline(base[key], color="grey", linestyle="--", label="base")
        axis.set_xscale("log")
        axis.set_xlabel("peak learning rate")
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    frontier = axes[3]
    for loss in LOSSES:
        points = sorted((r["lr"], r["heldout_nll_per_token"], r["heldout_m_theta"])
                        for r in rows if r["loss"] == loss)
        if points:
            frontier.plot([p[1] for p in points], [p[2] for p in points], marker="o",
                          label=loss, color=LOSS_COLOURS[loss])
            for lr, nll, m_theta in points:
                frontier.annotate(f"{lr:g}", (nll, m_theta), fontsize=7,
                                  textcoords="offset points", xytext=(3, 3))
    frontier.set_xlabel("held-out NLL / token (lower: learned more)")
    frontier.set_ylabel("held-out m_theta (lower: moved less)")
    frontier.set_title("m_theta against NLL, runs labelled by lr", fontsize=10)
    frontier.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv=None) -> None:
    args = parse_args(argv)
    console = Console(stderr=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # Resuming reuses caches and finished runs, so it is only allowed with the same data settings.
    settings = {k: str(v) for k, v in vars(args).items()
                if k not in {"losses", "lrs", "keep_checkpoints"}}
    settings_path = out / "settings.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != settings:
        raise SystemExit(f"{out} holds a sweep with other settings ({settings_path}); "
                         "use another --out")
    settings_path.write_text(json.dumps(settings, indent=2))
    started = time.perf_counter()
    train_data = take_rows(args.gsm8k_train, out / "data" / "train.jsonl", args.train_rows,
                           "gsm8k-train")
    heldout_data = take_rows(args.gsm8k_test, out / "data" / "heldout.jsonl",
                             args.heldout_rows, "gsm8k-test")
    caches = {}
    for name, data in (("train", train_data), ("heldout", heldout_data)):
        caches[name] = out / "cache" / f"{name}.parquet"
        if not caches[name].exists():
            run_precompute(PrecomputeConfig(
                model=args.model, data=str(data), out=str(caches[name]),
                prompt_field="question", response_field="answer", max_length=args.max_length,
                dtype="float32"), console)

    meta = {"model": args.model, "train_rows": args.train_rows,
            "heldout_rows": args.heldout_rows, "mmlu_files": [p.name for p in args.mmlu],
            "mmlu_per_file": args.mmlu_per_file, "beta": args.beta,
            "batch_size": args.batch_size, "epochs": args.epochs,
            "max_length": args.max_length, "seed": args.seed, "dtype": "float32",
            "machine": f"{platform.machine()}, {platform.system()}, python "
                       f"{platform.python_version()}"}
    rows = []
    base_eval = out / "base_eval.json"
    if not base_eval.exists():
        base_eval.write_text(json.dumps(evaluate(args.model, args, caches["heldout"], console,
                                                 out / "base_items.jsonl"), indent=2))
    rows.append(summary_row("base", None, None, json.loads(base_eval.read_text()), None, None))

    run_dirs = []
    # All losses at the first lr before any at the second: an interrupted sweep still compares
    # the three losses at equal settings.
    for lr in args.lrs:
        for loss in args.losses:
            run_dir = out / "runs" / f"{loss}-lr{lr:g}"
            run_dirs.append(run_dir)
            eval_path = run_dir / "eval.json"
            if not eval_path.exists():
                console.rule(f"{loss} lr={lr:g}")
                train_started = time.perf_counter()
                run_train(TrainConfig(
                    cache=str(caches["train"]), output=str(run_dir), loss=loss, beta=args.beta,
                    lr=lr, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                    epochs=args.epochs, seed=args.seed, dtype="float32",
                    overwrite=True),  # a run without its eval.json is done again, whole
                    console)
                seconds = time.perf_counter() - train_started
                result = evaluate(str(run_dir), args, caches["heldout"], console,
                                  run_dir / "items.jsonl")
                result["train_seconds"] = seconds
                eval_path.write_text(json.dumps(result, indent=2))
                if not args.keep_checkpoints:
                    for weights in run_dir.glob("*.safetensors"):
                        weights.unlink()
            result = json.loads(eval_path.read_text())
            history = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
            rows.append(summary_row(run_dir.name, loss, lr, result, history,
                                    result.get("train_seconds")))
            # Results so far, after every run: an interrupted sweep still leaves a table.
            paired = paired_rows(out, args.lrs)
            (out / "results.json").write_text(json.dumps(
                {"settings": meta, "rows": rows, "paired": paired}, indent=2))
            write_table(rows, out / "results.md", meta, paired)

    meta["wall_minutes_this_invocation"] = round((time.perf_counter() - started) / 60, 1)
    paired = paired_rows(out, args.lrs)
    (out / "results.json").write_text(json.dumps({"settings": meta, "rows": rows,
                                                  "paired": paired}, indent=2))
    write_table(rows, out / "results.md", meta, paired)
    plot_runs(run_dirs, out / "curves.png", title=f"{args.model}, {args.train_rows} GSM8K rows")
    plot_summary(rows, out / "summary.png")
    console.print(f"[green]done[/] in {meta['wall_minutes_this_invocation']} min: "
                  f"{out / 'results.md'}")


if __name__ == "__main__":
    sys.exit(main())
