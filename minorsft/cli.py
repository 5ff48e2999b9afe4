"""The `minorsft` command line: a thin face over the stages (build a config, call a function)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from minorsft import __version__
from minorsft.models import DEFAULT_MODEL

app = typer.Typer(
    help="Fine-tune chat LLMs with the MinorSFT loss (arXiv 2408.10642): score answers once "
         "under the reference model (precompute), then train the policy against that cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="Inspect reference caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
console = Console(stderr=True)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=2)


def _run(function, config):
    """Call a stage; turn the errors a user can fix into a clear message and exit code 2."""
    from minorsft.cache import CacheError
    from minorsft.data import DataError
    from minorsft.models import ModelError

    try:
        return function(config, console)
    except (DataError, CacheError, ModelError, ValueError, FileNotFoundError) as error:
        _fail(str(error))


def _version(value: bool):
    if value:
        typer.echo(f"minorsft {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    """minorsft: MinorSFT fine-tuning with a precomputed reference cache."""


@app.command()
def precompute(
    *,
    data: Annotated[str, typer.Option(help="Input .jsonl or .parquet file, or 'demo' for the "
                                           "built-in demo set.")],
    out: Annotated[Path, typer.Option(help="Cache file to write (Parquet).")] = Path(
        "cache/ref.parquet"),
    model: Annotated[str, typer.Option(help="Reference model: a Hugging Face folder, a hub id, "
                                            f"or the built-in '{DEFAULT_MODEL}'.")] = DEFAULT_MODEL,
    prompt_field: Annotated[str | None, typer.Option(
        help="Column holding the prompt (with --response-field), e.g. 'question'.")] = None,
    response_field: Annotated[str | None, typer.Option(
        help="Column holding the answer (with --prompt-field), e.g. 'answer'.")] = None,
    max_length: Annotated[int, typer.Option(
        help="Keep the first N tokens of each sample; answer tokens past N are dropped, and a "
             "row left without answer tokens is rejected. 0 for no limit.")] = 2048,
    dtype: Annotated[str, typer.Option(
        help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16. Score in the "
             "dtype you will train in.")] = "auto",
    engine: Annotated[str, typer.Option(help="Scoring engine: auto or transformers.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    max_batch_tokens: Annotated[int, typer.Option(
        help="Padded tokens per scoring batch (bounds memory).")] = 8192,
    on_bad: Annotated[str, typer.Option(
        help="What a bad input row does: 'error' stops with file, line and field; 'skip' "
             "writes it to <out>.rejects.jsonl with the reason.")] = "error",
):
    """Score every answer under the frozen reference model and write the Parquet cache."""
    from minorsft.precompute import PrecomputeConfig, run_precompute

    try:
        config = PrecomputeConfig(
            model=model, data=data, out=str(out), prompt_field=prompt_field,
            response_field=response_field, max_length=max_length or None, dtype=dtype,
            engine=engine, device=device, max_batch_tokens=max_batch_tokens, on_bad=on_bad)
    except ValueError as error:
        _fail(str(error))
    summary = _run(run_precompute, config)
    console.print(
        f"[green]wrote[/] {summary.cache_path}: {summary.rows_cached} rows cached, "
        f"{summary.rows_rejected} rejected, {summary.answer_tokens} answer tokens, "
        f"{summary.seconds:.1f} s", highlight=False)
    if summary.rejects_path:
        console.print(f"rejected rows and reasons: {summary.rejects_path}", highlight=False)


@app.command()
def train(
    *,
    cache: Annotated[Path, typer.Option(help="Cache written by `minorsft precompute`.")] = Path(
        "cache/ref.parquet"),
    output: Annotated[Path, typer.Option(help="Folder for the trained model, metrics.jsonl "
                                              "and run_config.json.")] = Path("runs/minorsft"),
    model: Annotated[str | None, typer.Option(
        help="The policy's starting model; default: the model that wrote the cache.")] = None,
    loss: Annotated[str, typer.Option(
        help="minorsft (eq. 7), sft (raw SFT, eq. 5) or sft-dpo (SFT using DPO, eq. 3).")
    ] = "minorsft",
    beta: Annotated[float, typer.Option(help="beta of MinorSFT and SFT-using-DPO.")] = 0.04,
    lr: Annotated[float | None, typer.Option(
        help="Peak learning rate; default: the paper's best, 2e-5 (minorsft, sft-dpo) or "
             "1e-5 (sft).")] = None,
    batch_size: Annotated[int, typer.Option(help="Global batch in samples (micro-batch x "
                                                 "accumulation).")] = 64,
    micro_batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 4,
    epochs: Annotated[int, typer.Option(help="Passes over the cache.")] = 1,
    max_steps: Annotated[int | None, typer.Option(
        help="Stop after N optimizer steps (overrides --epochs; cycles the data).")] = None,
    warmup_ratio: Annotated[float, typer.Option(help="Share of steps spent warming up the "
                                                     "lr linearly; then linear decay.")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for the data order and the model.")] = 42,
    dtype: Annotated[str, typer.Option(
        help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    attention: Annotated[str, typer.Option(
        help="auto (flash_attention_2 when installed on GPU, else sdpa), sdpa, eager or "
             "flash_attention_2.")] = "auto",
    gradient_checkpointing: Annotated[bool, typer.Option(
        help="Recompute activations in backward to save memory.")] = False,
    shuffle: Annotated[bool, typer.Option(help="Shuffle rows (seeded buffer).")] = True,
    allow_mismatch: Annotated[bool, typer.Option(
        help="Train even if the cache was written by a different model/tokenizer.")] = False,
):
    """Train the policy on the cache with MinorSFT, raw SFT or SFT-using-DPO."""
    from minorsft.train import TrainConfig, run_train

    try:
        config = TrainConfig(
            cache=str(cache), output=str(output), model=model, loss=loss, beta=beta, lr=lr,
            batch_size=batch_size, micro_batch_size=micro_batch_size, epochs=epochs,
            max_steps=max_steps, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
            max_grad_norm=max_grad_norm, seed=seed, dtype=dtype, device=device,
            attention=attention, gradient_checkpointing=gradient_checkpointing,
            shuffle=shuffle, allow_mismatch=allow_mismatch)
    except ValueError as error:
        _fail(str(error))
    _run(run_train, config)


@cache_app.command("info")
def cache_info(
    path: Annotated[Path, typer.Argument(help="A cache file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Show a cache's metadata, row count and answer-length distribution."""
    import polars as pl

    from minorsft.cache import CacheError, read_metadata

    try:
        metadata = read_metadata(path)
    except CacheError as error:
        _fail(str(error))
    frame = pl.read_parquet(path, columns=["num_tokens", "ref_logps"])
    stats = {
        "rows": frame.height,
        "num_tokens": frame["num_tokens"].describe().to_dicts(),
        "ref_logps_per_token_mean": float((frame["ref_logps"] / frame["num_tokens"]).mean()),
    }
    if as_json:
        typer.echo(json.dumps({"metadata": metadata, "stats": stats}, indent=2))
        return
    for key, value in metadata.items():
        typer.echo(f"{key:>20}: {value}")
    quantiles = {row["statistic"]: row["value"] for row in stats["num_tokens"]}
    typer.echo(f"{'answer tokens m':>20}: mean {quantiles.get('mean'):.1f}, min "
               f"{quantiles.get('min')}, median {quantiles.get('50%')}, max {quantiles.get('max')}")
    typer.echo(f"{'ref log-prob/token':>20}: {stats['ref_logps_per_token_mean']:.4f}")


@app.command("eval")
def eval_command(
    *,
    model: Annotated[str, typer.Option(help="Checkpoint to evaluate (a `minorsft train` output "
                                            "folder, a model folder or the built-in name).")],
    reference: Annotated[str | None, typer.Option(
        help="Reference for m_theta: a model, or a cache written by `minorsft precompute` on "
             "the held-out data (its token ids and log-probs are reused).")] = None,
    data: Annotated[str | None, typer.Option(help="Held-out SFT data (.jsonl/.parquet), any "
                                                  "format `precompute` reads.")] = None,
    choices: Annotated[list[str] | None, typer.Option(
        help="Multiple-choice file: MMLU-style CSV (question, A, B, C, D, answer; no header) "
             "or JSONL. Repeat for several.")] = None,
    prompt_field: Annotated[str | None, typer.Option(help="Prompt column of --data.")] = None,
    response_field: Annotated[str | None, typer.Option(help="Answer column of --data.")] = None,
    max_length: Annotated[int, typer.Option(help="Truncation of --data as in precompute; 0 "
                                                 "for none.")] = 2048,
    max_rows: Annotated[int | None, typer.Option(help="Only the first N held-out rows.")] = None,
    max_questions: Annotated[int | None, typer.Option(
        help="Only the first N questions of each --choices file.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    max_batch_tokens: Annotated[int, typer.Option(help="Padded tokens per batch.")] = 8192,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="Also write the result "
                                                                     "as JSON here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")
                       ] = False,
):
    """Held-out answer NLL, m_theta against a reference, and multiple-choice accuracy."""
    from minorsft.eval import EvalConfig, format_table, run_eval

    try:
        config = EvalConfig(
            model=model, reference=reference, data=data, choices=list(choices or []),
            prompt_field=prompt_field, response_field=response_field,
            max_length=max_length or None, max_rows=max_rows, max_questions=max_questions,
            dtype=dtype, device=device, max_batch_tokens=max_batch_tokens)
    except ValueError as error:
        _fail(str(error))
    result = _run(run_eval, config)
    text = json.dumps(result, indent=2)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    typer.echo(text if as_json else format_table(result))


@app.command()
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Folders written by `minorsft train`.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="PNG file to write.")] = Path(
        "runs.png"),
    title: Annotated[str | None, typer.Option(help="Figure title.")] = None,
):
    """Curves of m_theta, NLL, loss, coefficient, reward and lr against step for several runs."""
    from minorsft.plot import plot_runs

    try:
        written = plot_runs(run_dirs, out, title)
    except (FileNotFoundError, ValueError, ImportError) as error:
        _fail(str(error))
    console.print(f"[green]wrote[/] {written}", highlight=False)


def main():
    app()
