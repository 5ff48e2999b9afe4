"""The `minorsft` command line: a thin face over the stages (build a config, call a function)."""

from __future__ import annotations

import errno
import json
import os
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from minorsft import __version__
from minorsft.models import DEFAULT_MODEL, is_first_rank

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # (-h was an unknown option)


class _PlainFlags:
    """Help without a value placeholder after flags: typer 0.29 shows `--json <bool>`, read as
    taking a value (`--json true` is an error). And an empty path refused: typer reads
    `--output ""` (a script's unset variable) as the working folder."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params

    def parse_args(self, ctx, args):
        params = self.get_params(ctx)
        takes_path = {name: _is_path(param) for param in params
                      if not getattr(param, "is_flag", False)
                      and isinstance(param, typer.core.TyperOption)
                      for name in param.opts}
        path_arguments = [param for param in params if _is_path(param)
                          and isinstance(param, typer.core.TyperArgument)]
        index = 0
        while index < len(args):
            name, equals, value = args[index].partition("=")
            if name in takes_path:  # (an option and its value)
                if not equals:
                    index += 1
                    value = args[index] if index < len(args) else None
                if value == "" and (takes_path[name] or name in NOT_EMPTY):
                    _fail(f"{name} is empty; give {NOT_EMPTY.get(name, 'a path')}")
            elif args[index] == "" and path_arguments:
                _fail(f"an empty {path_arguments[0].name.upper()} argument; give a path")
            elif args[index] == "--":
                break
            index += 1
        return super().parse_args(ctx, args)


# Options besides those typed Path whose empty value is a mistake (a script's unset variable):
# `--data ""` read every data file in the working folder, `--prompt-field ""` was no option.
NOT_EMPTY = {"--data": "a file, folder or built-in data set", "--model": "a model",
             "--reference": "a model or cache", "--choices": "a file",
             **dict.fromkeys(("--prompt-field", "--response-field", "--system-field"),
                             "a column name")}


def _is_path(param) -> bool:
    """Whether a command's option or argument takes paths (Path, Path | None, list[Path])."""
    descriptor = getattr(param, "type_descriptor", None)
    annotation = str(getattr(descriptor, "annotation", ""))
    return annotation in {str(Path), str(Path | None), str(list[Path]),
                          str(list[Path] | None)}


class _Command(_PlainFlags, typer.core.TyperCommand):
    pass


class _Group(_PlainFlags, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    help="Fine-tune chat LLMs with the MinorSFT loss (arXiv 2408.10642): score answers once "
         "under the reference model (precompute), then train the policy against that cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=HELP_OPTIONS,
)
cache_app = typer.Typer(help="Inspect and merge reference caches.", no_args_is_help=True,
                        context_settings=HELP_OPTIONS, cls=_Group)
app.add_typer(cache_app, name="cache")
console = Console(stderr=True)

# Options grouped in `--help` (typer's help panels): precompute, train and eval have 17-40
# options each, which one flat list makes hard to scan.
_input = partial(typer.Option, rich_help_panel="Input")
_model = partial(typer.Option, rich_help_panel="Model and chat template")
_output = partial(typer.Option, rich_help_panel="Output and resuming")
_scoring = partial(typer.Option, rich_help_panel="Scoring")
_vllm = partial(typer.Option, rich_help_panel="vLLM engine")
_drift = partial(typer.Option, rich_help_panel="Drift check")
_files = partial(typer.Option, rich_help_panel="Input and output")
_loss = partial(typer.Option, rich_help_panel="Loss")
_optim = partial(typer.Option, rich_help_panel="Optimisation")
_speed = partial(typer.Option, rich_help_panel="Precision, speed and memory")
_lora = partial(typer.Option, rich_help_panel="LoRA")
_resume = partial(typer.Option, rich_help_panel="Checkpoints and resuming")
_checks = partial(typer.Option, rich_help_panel="Checks")
_multi = partial(typer.Option, rich_help_panel="Several GPUs (torchrun)")
_models = partial(typer.Option, rich_help_panel="Models")
_heldout = partial(typer.Option, rich_help_panel="Held-out data")
_choices = partial(typer.Option, rich_help_panel="Multiple choice")
_report = partial(typer.Option, rich_help_panel="Output")
_evaluation = partial(typer.Option, rich_help_panel="Held-out evaluation")


def _fail(message: str) -> None:
    # escape: a message quotes paths and fields, and rich would take "[lora]" for a style
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


# Errors of the disk rather than of minorsft: said in one line, without a traceback.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _run(function, config):
    """Call a stage; turn the errors a user can fix into a clear message and exit code 2."""
    from minorsft.cache import CacheError
    from minorsft.data import DataError
    from minorsft.models import ModelError

    try:
        return function(config, console)
    except (DataError, CacheError, ModelError, ValueError, FileNotFoundError,
            FloatingPointError) as error:  # (a loss that became nan: too high an lr)
        _fail(str(error))
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        where = f" ({error.filename})" if error.filename else ""
        _fail(f"{error.strerror}{where}: free space, fix permissions, or write elsewhere")
    except Exception as error:
        # safetensors reports a full disk in its own exception type, with the OS's words
        if type(error).__name__ == "SafetensorError" and "No space left" in str(error):
            _fail(f"no space left on the device while writing the model ({error}); free space "
                  "or choose another --output")
        # torch.compile (on by default on CUDA) fails at the first step with a long trace; the
        # inputs are untouched, and the way out is one flag.
        if type(error).__module__.startswith(("torch._dynamo", "torch._inductor")):
            summary = str(error).strip().splitlines()[0] if str(error).strip() else ""
            _fail(f"torch.compile failed ({type(error).__name__}: {summary}); train again "
                  "with --no-compile")
        raise


def _check_writable_file(path: Path, option: str) -> None:
    """Fail now, in one line, if `path` cannot be written as a file (a folder, no permission)."""
    if path.is_dir():
        _fail(f"{option} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _fail(f"{option} {path}: cannot create its folder ({error.strerror})")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        _fail(f"{option} {path}: not writable")


def _refuse_writing_over_inputs(outputs: dict[str, Path | None],
                                inputs: dict[str, list[str]]) -> None:
    """Fail if an output file is one of the inputs, an existing file in an input folder (a
    model's config.json), a file in a --data folder (the next run would read it as data), or
    the other output: `eval --per-item held.jsonl --data held.jsonl` replaced the data."""
    given = {option: path.resolve() for option, path in outputs.items() if path}
    if len(set(given.values())) < len(given):
        _fail(f"{' and '.join(given)} name the same file; give each its own")
    for option, out in given.items():
        for input_option, names in inputs.items():
            for name in names:
                source = Path(name).expanduser()
                if not source.exists():  # (a built-in name, a hub id, a pattern)
                    continue
                source = source.resolve()
                inside = source.is_dir() and out.is_relative_to(source)
                if out == source or (inside and (out.exists() or input_option == "--data")):
                    _fail(f"{option} {outputs[option]} would write over "
                          f"{'' if out == source else 'a file of '}{input_option} {name}; "
                          "write it elsewhere")


# `--data data/train-*.parquet` unquoted: the shell gives the files after the first as
# arguments (left out of the usage line: they are --data's, not arguments of their own).
EXTRA_ARGUMENTS = {"allow_extra_args": True}


def _data_names(given: list[str] | None, more: list[str] | None) -> str | list[str] | None:
    """--data's values (repeated, or a pattern the shell expanded into arguments) as one name
    or a list; an argument that is no file is a stray, not data."""
    for name in more or ():
        if not os.path.exists(os.path.expanduser(name)):
            _fail(f"unexpected argument {name!r}: the only arguments taken are more --data "
                  "files, as a shell gives them for an unquoted pattern")
    names = [*(given or ()), *(more or ())]
    return None if not names else names[0] if len(names) == 1 else names


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


@app.command(cls=_Command, context_settings=EXTRA_ARGUMENTS)
def precompute(
    context: typer.Context,
    *,
    data: Annotated[list[str], _input(help=(
        "Input .jsonl or .parquet file; a folder of them, or a quoted pattern such as "
        "'data/train-*.parquet' (read in name order); or 'demo' (and 'demo-heldout')"
        " for the built-in demo set (and its held-out rows). "
        "Repeat for several, read in the order given."))],
    out: Annotated[Path, _output(
        help="Cache directory to write (Parquet parts + manifest). Re-running the same command "
             "resumes it.")] = Path("cache/ref.parquet"),
    model: Annotated[str, _model(help="Reference model: a Hugging Face folder, a hub id, "
                                            f"or the built-in '{DEFAULT_MODEL}'.")] = DEFAULT_MODEL,
    prompt_field: Annotated[str | None, _input(
        help="Column holding the prompt (with --response-field), e.g. 'question'.")] = None,
    response_field: Annotated[str | None, _input(
        help="Column holding the answer (with --prompt-field), e.g. 'answer'.")] = None,
    system_field: Annotated[str, _input(
        help="Column holding a system prompt, where a row has one (e.g. 'system_prompt').")
    ] = "system",
    train_turns: Annotated[str, _input(
        help="Which assistant turns of a chat are answer: 'all' (each one not marked weight 0 "
             "or training false) or 'last' (the last of them; the earlier ones are prompt, as "
             "LLaMA-Factory's mask_history).")] = "all",
    chat_template: Annotated[str | None, _model(
        help="Render the data with this chat template instead of the model's own (needed for "
             "a tokenizer without one, as most base models'): the built-in 'chatml' or 'plain' "
             "(the turns' text one after the other, eos after each answer, as TRL trains "
             "string prompt/completion rows), a .jinja file, or a model folder. The cache "
             "keeps it; train, verify and eval use it, and the trained model is saved with it.",
        show_default=False)] = None,
    max_length: Annotated[int, _model(
        help="Keep the first N tokens of each sample; answer tokens past N are dropped, and a "
             "row left without answer tokens is rejected. 0 for no limit.")] = 2048,
    dtype: Annotated[str, _model(
        help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16 or (transformers "
             "engine) bf16-mixed, fp16-mixed. Score in the dtype you will train in.")] = "auto",
    load_in_4bit: Annotated[bool, _model(
        "--load-in-4bit", help="Score under the model with its linear layers in 4-bit NF4 "
        "(bitsandbytes; transformers engine), the base that `train --load-in-4bit` (QLoRA) "
        "starts from.")] = False,
    engine: Annotated[str, _scoring(
        help="Scoring engine: vllm, transformers, or auto (vllm when it is installed and a "
             "CUDA GPU is present, else transformers).")] = "auto",
    device: Annotated[str, _scoring(help="auto, cpu, cuda or cuda:N (transformers "
                                             "engine; vLLM picks its own).")] = "auto",
    max_batch_tokens: Annotated[int | None, _scoring(
        help="Tokens per scoring batch, which bounds memory: padded tokens per forward pass "
             "(transformers; default 1024 on a CPU, where small batches are faster, 16384 on "
             "a GPU) or vLLM's max_num_batched_tokens per engine step (default 8192; prompt "
             "log-probs hold a tokens x vocab fp32 tensor).", show_default=False)] = None,
    tensor_parallel_size: Annotated[int | None, _vllm(
        help="vLLM: GPUs to shard the model over.")] = None,
    gpu_memory_utilization: Annotated[float | None, _vllm(
        help="vLLM: share of GPU memory it may take (default 0.9; on a CPU build, share of "
             "RAM, default 0.3).")] = None,
    max_model_len: Annotated[int | None, _vllm(
        help="vLLM: longest sequence + 1 (default: --max-length + 1, at most the model's "
             "context + 1, RoPE scaling included; with --max-length 0, the context + 1).")
    ] = None,
    verify_sample: Annotated[int, _drift(
        help="Rows recomputed at the end by the trainer's engine to measure the cache's "
             "drift (stored in the cache metadata; see `minorsft verify`). 0 skips.")] = 16,
    verify_dtype: Annotated[str, _drift(
        help="The dtype training will use, for that check (auto: fp32 on CPU, bf16 on "
             "GPU; or bf16-mixed, fp16-mixed).")] = "auto",
    on_bad: Annotated[str, _input(
        help="What a bad input row does: 'error' stops with file, line and field; 'skip' "
             "writes it to <out>/_rejects.jsonl with the reason.")] = "error",
    tokenize_workers: Annotated[int | None, _scoring(
        help="Processes that render and tokenize rows beside the scoring (the same cache "
             "with any number). Default: none on a CPU, where scoring takes the time; on a "
             "GPU half the cores, at most 8. 0: tokenize in this process.",
        show_default=False)] = None,
    part_rows: Annotated[int, _output(
        help="Input rows per part file: the unit of resuming and sharding.")] = 4096,
    shard: Annotated[str | None, _output(
        help="I/N: score only the parts k with k mod N = I (I counts from 0). Run N processes "
             "(GPUs, nodes) with the same --out, or join their outputs with `minorsft cache "
             "merge`.")] = None,
    overwrite: Annotated[bool, _output(
        help="Start over: delete the cache at --out instead of resuming it.")] = False,
):
    """Score every answer under the frozen reference model and write the Parquet cache."""
    from minorsft.precompute import PrecomputeConfig, run_precompute

    try:
        config = PrecomputeConfig(
            model=model, data=_data_names(data, context.args), out=str(out),
            prompt_field=prompt_field,
            response_field=response_field, system_field=system_field,
            train_turns=train_turns,
            chat_template=chat_template, max_length=max_length or None, dtype=dtype,
            load_in_4bit=load_in_4bit,
            engine=engine, device=device, max_batch_tokens=max_batch_tokens, on_bad=on_bad,
            part_rows=part_rows, shard=shard, overwrite=overwrite,
            tokenize_workers=tokenize_workers, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            verify_sample=verify_sample, verify_dtype=verify_dtype)
    except ValueError as error:
        _fail(str(error))
    try:
        summary = _run(run_precompute, config)
    except KeyboardInterrupt:
        console.print(f"[yellow]stopped:[/] {escape(_parts_kept(out))}", highlight=False)
        raise typer.Exit(code=130) from None
    skipped = summary.parts_skipped
    resumed = (f" ({skipped} part{' was' if skipped == 1 else 's were'} already done)"
               if skipped else "")
    # (the summary did not say that rows were cut)
    cut = (f" ({summary.rows_truncated} cut at --max-length {config.max_length})"
           if summary.rows_truncated else "")
    if not summary.complete:
        console.print(
            f"[green]shard {shard} done[/]: {summary.rows_cached} rows cached{cut}, "
            f"{summary.rows_rejected} rejected{resumed}. The cache is not complete yet: "
            f"{escape(str(summary.waiting_for))}. Shards that share this --out complete it "
            "there; shards written to other folders are joined with `minorsft cache merge "
            "DIR... --out CACHE`.", highlight=False)
        return
    console.print(
        f"[green]wrote[/] {escape(str(summary.cache_path))}: {summary.rows_in} input rows = "
        f"{summary.rows_cached} cached{cut} + {summary.rows_rejected} rejected, "
        f"{summary.answer_tokens} answer tokens, {summary.seconds:.1f} s{resumed}",
        highlight=False)
    if summary.rejects_path:
        console.print(f"rejected rows and reasons: {summary.rejects_path}", highlight=False,
                      markup=False)


@app.command(cls=_Command)
def train(
    *,
    cache: Annotated[Path, _files(help="Cache written by `minorsft precompute`.")] = Path(
        "cache/ref.parquet"),
    output: Annotated[Path, _files(help="Folder for the trained model, metrics.jsonl "
                                              "and run_config.json.")] = Path("runs/minorsft"),
    model: Annotated[str | None, _files(
        help="The policy's starting model; default: the model that wrote the cache.")] = None,
    eval_cache: Annotated[Path | None, _evaluation(
        help="A cache `minorsft precompute` wrote from held-out rows: the policy's NLL per "
             "answer token and m_theta against its reference log-probs, before the first "
             "step and every --eval-every steps, go to <output>/eval_metrics.jsonl and the "
             "plot.", show_default=False)] = None,
    eval_every: Annotated[int | None, _evaluation(
        help="Steps between held-out evaluations (default: about ten over the run; the "
             "last step is always evaluated).", show_default=False)] = None,
    eval_rows: Annotated[int | None, _evaluation(
        help="Only the first N rows of --eval-cache.", show_default=False)] = None,
    loss: Annotated[str, _loss(
        help="minorsft (eq. 7), sft (raw SFT, eq. 5) or sft-dpo (SFT using DPO, eq. 3).")
    ] = "minorsft",
    beta: Annotated[float, _loss(help="beta of MinorSFT and SFT-using-DPO.")] = 0.04,
    lr: Annotated[float | None, _optim(
        help="Peak learning rate; default: the paper's best, 2e-5 (minorsft, sft-dpo) or "
             "1e-5 (sft).")] = None,
    batch_size: Annotated[int, _optim(help="Global batch in samples (micro-batch x "
                                                 "accumulation).")] = 64,
    micro_batch_size: Annotated[int, _optim(help="Samples per forward pass.")] = 4,
    epochs: Annotated[int, _optim(help="Passes over the cache.")] = 1,
    max_steps: Annotated[int | None, _optim(
        help="Stop after N optimizer steps (overrides --epochs; cycles the data).")] = None,
    warmup_ratio: Annotated[float, _optim(help="Share of steps spent warming up the "
                                                     "lr linearly; then linear decay.")] = 0.1,
    weight_decay: Annotated[float, _optim(
        help="AdamW weight decay, of weight matrices and embeddings; biases and norm gains "
             "are left out, as transformers' Trainer does.")] = 0.0,
    max_grad_norm: Annotated[float, _optim(help="Gradient clipping norm.")] = 1.0,
    seed: Annotated[int, _optim(help="Seed for the data order and the model.")] = 42,
    dtype: Annotated[str, _speed(
        help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, bf16-mixed (fp32 weights "
             "and updates, forward and backward under bf16 autocast: about twice as fast as "
             "float32 on CPUs with bf16 instructions) or fp16-mixed (the same under fp16 "
             "autocast with dynamic loss scaling, for GPUs without bf16: T4, V100). Not "
             "float16: its small gradients round to 0.")] = "auto",
    device: Annotated[str, _speed(help="auto, cpu, cuda or cuda:N.")] = "auto",
    attention: Annotated[str, _speed(
        help="auto (flash_attention_2 when installed on GPU, else sdpa), sdpa, eager, "
             "flash_attention_2, flash_attention_3 or flex_attention.")] = "auto",
    gradient_checkpointing: Annotated[bool, _speed(
        help="Recompute activations in backward to save memory.")] = False,
    keep_dropout: Annotated[bool, _optim(
        help="Train with the model's own dropout rates. By default every dropout is off, as "
             "when the cache was scored: its noise would enter r.")] = False,
    shuffle: Annotated[bool, _optim(help="Shuffle rows (seeded buffer).")] = True,
    allow_mismatch: Annotated[bool, _files(
        help="Train even if the cache was written by a different model/tokenizer (the "
             "step-0 check then warns instead of stopping).")] = False,
    save_every: Annotated[int | None, _resume(
        help="Write a checkpoint (model, optimizer, scheduler, RNG, data position) every N "
             "steps under <output>/checkpoints. Ctrl-C and SIGTERM always write one.")] = None,
    keep_checkpoints: Annotated[int, _resume(
        help="How many of the newest checkpoints to keep.")] = 2,
    resume: Annotated[bool, _resume(
        help="Continue from the newest checkpoint in --output (from step 0 if there is "
             "none; on a finished run: nothing to do with the same settings, refused with "
             "other ones).")] = False,
    overwrite: Annotated[bool, _resume(
        help="Replace the run in --output (its model, metrics and checkpoints); without it an "
             "--output that holds a run is refused.")] = False,
    step0_check: Annotated[bool, _checks(
        help="Before training, check on a few rows that the policy's own log-probs match the "
             "cache (step-0 m_theta near 0).")] = True,
    step0_tolerance: Annotated[float | None, _checks(
        help="Largest mean |log-ratio| per answer token the step-0 check accepts; default 1e-3 "
             "when cache and training are float32, else 0.1.")] = None,
    strategy: Annotated[str, _multi(
        help="Under torchrun: ddp (replicated model) or fsdp (FSDP2, sharded, fp32 master "
             "weights with --dtype as compute dtype).")] = "ddp",
    cpu_offload: Annotated[bool, _multi(
        help="FSDP only: keep parameters, gradients and optimizer state on the CPU.")] = False,
    packing: Annotated[bool | None, _speed(
        "--packing/--no-packing",
        help="Padding-free: run each micro-batch as one row of concatenated samples, each "
             "attending only to itself (same log-probs, no padding). Default: on where no "
             "dense block mask is needed (flash-attn, or SDPA, which minorsft runs per "
             "sample) and the model passes an isolation check; else padded.",
        show_default=False)] = None,
    lora_r: Annotated[int, _lora(
        help="LoRA rank; 0 trains all weights. Needs `pip install 'minorsft\\[lora]'`.")] = 0,
    lora_alpha: Annotated[float, _lora(help="LoRA alpha (scale alpha/r).")] = 16.0,
    lora_dropout: Annotated[float, _lora(help="LoRA dropout.")] = 0.0,
    lora_target_modules: Annotated[str, _lora(
        help="'all-linear' or comma-separated module names, e.g. 'q_proj,v_proj'.")
    ] = "all-linear",
    merge_lora: Annotated[bool, _lora(
        help="Besides the adapters, save a merged plain model in <output>/merged.")] = False,
    load_in_4bit: Annotated[bool, _lora(
        "--load-in-4bit", help="QLoRA: the base model's linear layers in 4-bit NF4 "
        "(bitsandbytes: `pip install 'minorsft\\[qlora]'`), LoRA adapters trained on them; "
        "the cache must be scored by `precompute --load-in-4bit`. --merge-lora merges into "
        "the base read again in --dtype.")] = False,
    master_weights: Annotated[bool, _speed(
        help="With bf16/fp16 weights, let AdamW update fp32 copies of them (12 more bytes per "
             "parameter). Without, updates under half a bf16 step (most, at lr 2e-5) are "
             "rounded away.")] = True,
    torch_compile: Annotated[bool | None, _speed(
        "--compile/--no-compile",
        help="torch.compile the decoder layers and the output head's block arithmetic: fewer, "
             "fused kernels, after a compile of about 10 s in the first step (compiled layers: "
             "1.2 x the tokens/s on an H200). Needs Triton on GPUs, a "
             "C++ compiler on CPUs. Default: on for CUDA when Triton is installed, off on CPUs "
             "and under --strategy fsdp (refused there).",
        show_default=False)] = None,
):
    """Train the policy on the cache with MinorSFT, raw SFT or SFT-using-DPO."""
    from minorsft.checkpoints import TrainingInterrupted
    from minorsft.train import TrainConfig, run_train

    try:
        config = TrainConfig(
            cache=str(cache), output=str(output), model=model, loss=loss, beta=beta, lr=lr,
            batch_size=batch_size, micro_batch_size=micro_batch_size, epochs=epochs,
            max_steps=max_steps, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
            max_grad_norm=max_grad_norm, seed=seed, dtype=dtype, device=device,
            attention=attention, gradient_checkpointing=gradient_checkpointing,
            keep_dropout=keep_dropout,
            shuffle=shuffle, allow_mismatch=allow_mismatch, strategy=strategy,
            cpu_offload=cpu_offload, save_every=save_every, keep_checkpoints=keep_checkpoints,
            resume=resume, overwrite=overwrite, step0_check=step0_check,
            step0_tolerance=step0_tolerance,
            packing=packing, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            lora_target_modules=lora_target_modules, merge_lora=merge_lora,
            load_in_4bit=load_in_4bit,
            master_weights=master_weights, torch_compile=torch_compile,
            eval_cache=str(eval_cache) if eval_cache else None, eval_every=eval_every,
            eval_rows=eval_rows)
    except ValueError as error:
        _fail(str(error))
    try:
        _run(run_train, config)
    except TrainingInterrupted as stopped:
        if is_first_rank():  # every rank stopped; one says so
            console.print(f"[yellow]stopped:[/] {escape(str(stopped))}", highlight=False)
        _leave_torchrun_worker(130)
        raise typer.Exit(code=130) from None
    except KeyboardInterrupt:  # a second Ctrl-C (or one while loading): it ended in silence
        if is_first_rank():
            console.print(f"[yellow]stopped at once:[/] {escape(_resume_point(output))}",
                          highlight=False)
        _leave_torchrun_worker(130)
        raise typer.Exit(code=130) from None
    except typer.Exit as stop:  # an error already said in one line
        _leave_torchrun_worker(stop.exit_code)
        raise
    except Exception:
        # Unforeseen: its traceback is the report. Under torchrun the worker still leaves
        # without finalization, with an error's exit code rather than gloo's abort.
        if _under_torchrun():
            console.print_exception()
            _leave_torchrun_worker(1)
        raise
    _leave_torchrun_worker()


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _leave_torchrun_worker(code: int = 0) -> None:
    """Under torchrun, exit with `code` without interpreter finalization.

    Gloo's worker threads can outlive `destroy_process_group` and abort the process while the
    interpreter tears down ("terminate called without an active exception", SIGABRT; seen about
    once in six FSDP runs on a busy 2-core machine), which torchrun reports as a failed run
    although the model and metrics were written. After success everything is saved and closed
    by now; after an error (said already, the process group left as it is) the exit code is
    the error's, not an abort's.
    """
    import sys

    if _under_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@app.command(cls=_Command)
def verify(
    *,
    cache: Annotated[Path, typer.Option(help="Cache written by `minorsft precompute`.")] = Path(
        "cache/ref.parquet"),
    model: Annotated[str | None, typer.Option(
        help="The model training will start from; default: the model that wrote the "
             "cache.")] = None,
    sample: Annotated[int, typer.Option(help="Random rows to recompute.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the row sample.")] = 0,
    beta: Annotated[float, typer.Option(help="The beta training will use.")] = 0.04,
    dtype: Annotated[str, typer.Option(
        help="The dtype training will use: auto (fp32 on CPU, bf16 on GPU), float32, "
             "bfloat16, bf16-mixed or fp16-mixed (float16 is measured too, but train refuses "
             "it).")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    max_batch_tokens: Annotated[int | None, typer.Option(
        help="Tokens per scoring batch (default 1024 on a CPU, 16384 on a GPU).",
        show_default=False)] = None,
    max_delta_r: Annotated[float, typer.Option(
        help="Exit with status 1 when any sampled answer's |delta r| exceeds this (nats).")
    ] = 1.0,
    rescore: Annotated[bool, typer.Option(
        help="Also recompute the sample with the cache's own engine (vLLM: starts it) to get "
             "per-token figures.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    allow_mismatch: Annotated[bool, typer.Option(
        help="Check even if the cache was written by a different model/tokenizer.")] = False,
    store: Annotated[bool, typer.Option(
        help="Write the figures into the cache's metadata, where `cache info` shows them (as "
             "precompute's --verify-sample does; replaces figures stored before).")] = False,
):
    """Measure how far the cache's reference log-probs are from what training computes."""
    from minorsft.verify import VerifyConfig, run_verify

    try:
        config = VerifyConfig(
            cache=str(cache), model=model, sample=sample, seed=seed, beta=beta, dtype=dtype,
            device=device, max_batch_tokens=max_batch_tokens, max_delta_r=max_delta_r,
            rescore=rescore, allow_mismatch=allow_mismatch, store=store)
    except ValueError as error:
        _fail(str(error))
    report = _run(run_verify, config)
    if as_json:
        from minorsft.jsonl import json_safe

        typer.echo(json.dumps(json_safe(report.as_dict()), indent=2, allow_nan=False))
    if not report.passed:
        raise typer.Exit(code=1)


def _plain_value(value) -> str:
    """A metadata value as `cache info` shows it: nested dicts as key=value lists, floats short."""
    if isinstance(value, dict):
        return ", ".join(f"{key}={_plain_value(item)}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_plain_value(item) for item in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@cache_app.command("info", cls=_Command)
def cache_info(
    path: Annotated[Path, typer.Argument(help="A cache (parts directory or single file).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Show a cache's layout, schema, metadata, row counts, m distribution and drift figures."""
    from minorsft.cache import cache_stats

    info = _run(lambda cache, _console: cache_stats(cache), path)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    metadata = info["metadata"]
    if info["incomplete"]:
        typer.echo(f"{'status':>20}: INCOMPLETE, what is there so far is shown "
                   f"(train and verify refuse it until it is whole): "
                   + "; ".join(info["incomplete"]))
    if info["problems"]:  # (an incomplete cache's rows so far too: they will not heal)
        typer.echo(f"{'status':>20}: CORRUPT (train, eval and verify refuse it): "
                   + " ".join(info["problems"]))
    if not info["rows"]:  # (every input row rejected)
        typer.echo(f"{'status':>20}: NO ROWS (train refuses it): every input row was "
                   "rejected; see its _rejects.jsonl")
    elif not (info["incomplete"] or info["problems"]):
        typer.echo(f"{'status':>20}: complete")
    counts = ("rows", "rows_in", "rows_rejected")  # shown together in the "rows" line below
    for key, value in metadata.items():
        if key == "chat_template" and isinstance(value, dict):  # (its text: many lines)
            typer.echo(f"{key:>20}: --chat-template {value.get('given')} "
                       f"({len(value.get('text') or '')} characters; --json shows it)")
        elif key == "source_files" and isinstance(value, list) and len(value) > 6:
            typer.echo(f"{key:>20}: {len(value)} files, {', '.join(value[:2])}, ..., "
                       f"{value[-1]} (--json lists them)")
        elif key == "quantization" and value is None:  # (not scored in 4-bit)
            continue
        elif key == "left_out" and isinstance(value, dict):  # (precompute's note, kept)
            typer.echo(f"{'left-out columns':>20}: " + "; ".join(
                f"{column!r} in {tally.get('rows')} rows (the first: {tally.get('first')})"
                for column, tally in sorted(value.items())) + " (text the cache does not hold)")
        elif key != "drift" and key not in counts:
            typer.echo(f"{key:>20}: {_plain_value(value)}")
    typer.echo(f"{'schema':>20}: {info['schema']}")
    typer.echo(f"{'rows':>20}: {info['rows']} cached"
               + (f" + {metadata.get('rows_rejected')} rejected = {metadata.get('rows_in')} "
                  "input rows" if metadata.get("rows_in") is not None else ""))
    if m := info["num_tokens"]:
        typer.echo(f"{'answer tokens m':>20}: mean {m['mean']:.1f}, min {m['min']}, "
                   f"p10 {m['p10']}, median {m['p50']}, p90 {m['p90']}, max {m['max']}")
    if r := info["ref_logps_per_token"]:
        typer.echo(f"{'ref log-prob/token':>20}: mean {r['mean']:.4f}, min {r['min']:.4f}, "
                   f"max {r['max']:.4f}")
    typer.echo(f"{'truncated rows':>20}: {info['truncated']}")
    drift = metadata.get("drift")
    if drift is None:
        typer.echo(f"{'drift':>20}: not measured for this cache")
    elif isinstance(drift, dict):
        for key, value in drift.items():
            # (per-token figures need the scoring engine's own values: `verify --rescore`)
            shown = "not measured" if value is None else _plain_value(value)
            typer.echo(f"{'drift ' + key:>20}: {shown}")
    else:
        typer.echo(f"{'drift':>20}: {drift}")


@cache_app.command("merge", cls=_Command)
def cache_merge(
    sources: Annotated[list[Path], typer.Argument(
        help="Parts directories to combine (e.g. one per --shard run).")],
    out: Annotated[Path, typer.Option(help="The merged cache directory to write.")],
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it is a cache.")] = False,
):
    """Combine the shards of one precompute (same input and settings) into one cache."""
    from minorsft.cache import merge_caches

    layout = _run(lambda _config, _console: merge_caches(sources, out, overwrite), None)
    metadata = layout.metadata
    console.print(f"[green]merged[/] {len(sources)} source(s) into {escape(str(out))}: "
                  f"{metadata['parts']} parts, {metadata['rows']} rows cached, "
                  f"{metadata['rows_rejected']} rejected",
                  highlight=False)
    if "drift" not in metadata:  # shards in separate folders never got to the drift check
        console.print(f"drift between the cache and the trainer is not measured yet: `minorsft "
                      f"verify --cache {escape(str(out))} --store` measures it and keeps it "
                      "in the cache's metadata, where `cache info` shows it",
                      highlight=False)


@app.command("eval", cls=_Command, context_settings=EXTRA_ARGUMENTS)
def eval_command(
    context: typer.Context,
    *,
    model: Annotated[str, _models(help="Model to evaluate (a `minorsft train` output "
                                            "folder, a LoRA run's scored as it trained: "
                                            "adapters on its base, 4-bit for QLoRA; a model "
                                            "folder or the built-in name; not a --save-every "
                                            "checkpoint, which is for --resume).")],
    reference: Annotated[str | None, _models(
        help="Reference for m_theta: a model (needs --data), or a cache written by `minorsft "
             "precompute` on the held-out data (its token ids and log-probs are reused; then "
             "no --data).")
    ] = None,
    base_model: Annotated[str | None, _models(
        help="Where the base model of a LoRA run given to --model is now, if it moved since "
             "training (checked against the run's record of it: weights, and config.json for "
             "runs of 0.9.3 on).", show_default=False)] = None,
    reference_base_model: Annotated[str | None, _models(
        help="The same for a LoRA run given as --reference.", show_default=False)] = None,
    data: Annotated[list[str] | None, _heldout(help=(
        "Held-out SFT data (.jsonl/.parquet, a folder or a quoted pattern; repeat for "
        "several), any format `precompute` reads."))] = None,
    choices: Annotated[list[str] | None, _choices(
        help="Multiple-choice file: MMLU-style CSV (question, A, B, C, D, answer letter A-D; "
             "no header, or exactly that one) or JSONL (answer A-D or 0-3). Repeat for "
             "several.")] = None,
    prompt_field: Annotated[str | None, _heldout(help="Prompt column of --data.")] = None,
    response_field: Annotated[str | None, _heldout(help="Answer column of --data.")] = None,
    system_field: Annotated[str, _heldout(
        help="System-prompt column of --data.")] = "system",
    train_turns: Annotated[str, _heldout(
        help="Which assistant turns of a --data chat are scored, as precompute's: 'all' or "
             "'last'.")] = "all",
    chat_template: Annotated[str | None, _heldout(
        help="Chat template to render --data and --choices with, as precompute's (default: "
             "the one a cache --reference was written with, else the model's own).",
        show_default=False)] = None,
    max_length: Annotated[int, _heldout(help="Truncation of --data as in precompute; 0 "
                                                 "for none.")] = 2048,
    max_rows: Annotated[int | None, _heldout(help="Only the first N held-out rows.")] = None,
    on_bad: Annotated[str, _heldout(
        help="What a bad --data row does: 'error' stops with file, line and field; 'skip' "
             "scores the others, says how many were rejected and lists them with the reason "
             "in the JSON (--json, --json-out).")] = "error",
    max_questions: Annotated[int | None, _choices(
        help="Only the first N questions of each --choices file.")] = None,
    dtype: Annotated[str, _scoring(
        help="auto, float32, bfloat16, float16, bf16-mixed or fp16-mixed.")] = "auto",
    device: Annotated[str, _scoring(help="auto, cpu, cuda or cuda:N.")] = "auto",
    max_batch_tokens: Annotated[int | None, _scoring(
        help="Padded tokens per batch (default 1024 on a CPU, 16384 on a GPU).",
        show_default=False)] = None,
    json_out: Annotated[Path | None, _report("--json-out", help="Also write the result "
                                                                     "as JSON here.")] = None,
    per_item: Annotated[Path | None, _report(
        "--per-item", help="Also write one JSONL line per held-out row (log-probs, NLL, r/m) "
                           "and per question (predicted letter, correct, letter log-probs) "
                           "here: for comparing checkpoints row by row.")] = None,
    as_json: Annotated[bool, _report("--json", help="Print JSON instead of a table.")
                       ] = False,
):
    """Held-out answer NLL, m_theta against a reference, and multiple-choice accuracy."""
    from minorsft.eval import EvalConfig, format_table, run_eval

    if stray := context.args:  # (--data and --choices take files: which one was it for?)
        _fail(f"unexpected argument(s) {' '.join(stray)}: an unquoted pattern the shell "
              "expanded? Quote it (--data 'dir/test-*.parquet') or repeat the option for each "
              "file")

    try:
        config = EvalConfig(
            model=model, reference=reference, data=_data_names(data, None),
            choices=list(choices or []),
            prompt_field=prompt_field, response_field=response_field,
            system_field=system_field, train_turns=train_turns, chat_template=chat_template,
            max_length=max_length or None, max_rows=max_rows, max_questions=max_questions,
            dtype=dtype, device=device, max_batch_tokens=max_batch_tokens,
            per_item=str(per_item) if per_item else None, on_bad=on_bad,
            base_model=base_model, reference_base_model=reference_base_model)
    except ValueError as error:
        _fail(str(error))
    # before minutes of scoring: a path it cannot write would lose them
    for path, option in ((json_out, "--json-out"), (per_item, "--per-item")):
        if path:
            _check_writable_file(path, option)
    _refuse_writing_over_inputs({"--json-out": json_out, "--per-item": per_item}, {
        "--model": [model], "--reference": [reference] if reference else [],
        "--data": list(data or []), "--choices": list(choices or [])})
    result = _run(run_eval, config)
    text = json.dumps(result, indent=2, allow_nan=False)  # NaN is not JSON: fail, not write
    typer.echo(text if as_json else format_table(result))  # (first: a failed write loses none)
    if json_out:
        try:
            json_out.write_text(text + "\n")
        except OSError as error:
            _fail(f"--json-out {json_out}: cannot write it ({error.strerror or error}); the "
                  "result is printed above")


@app.command(cls=_Command)
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Folders written by `minorsft train`.",
                                                   metavar="RUN_DIR")],
    out: Annotated[Path, typer.Option("-o", "--out", help="PNG file to write.")] = Path(
        "runs.png"),
    title: Annotated[str | None, typer.Option(help="Figure title.")] = None,
):
    """Curves of m_theta, NLL, loss, coefficient, reward and lr against step for several runs."""
    from minorsft.plot import plot_runs

    _check_writable_file(out, "-o")
    try:
        written = plot_runs(run_dirs, out, title)
    except (FileNotFoundError, ValueError, ImportError) as error:
        _fail(str(error))
    console.print(f"[green]wrote[/] {escape(str(written))}", highlight=False)


def _parts_kept(out: Path) -> str:
    """What a stopped precompute leaves to resume from (it said "the parts finished so far are
    kept" where none was)."""
    from minorsft.cache import CacheError, load_manifests

    try:
        done = sum(len(m["parts"]) for m in load_manifests(out)) if out.is_dir() else 0
    except CacheError:
        done = 0
    if not done:
        return "no part was finished, so nothing is kept; the same command starts it again"
    return (f"the {done} part{'s' * (done != 1)} finished so far {'are' if done != 1 else 'is'} "
            "kept; run the same command again to resume")


def _resume_point(output: Path) -> str:
    """Where `train --resume` would go on from, after a stop that saved nothing."""
    from minorsft.checkpoints import list_checkpoints

    if checkpoints := list_checkpoints(output):
        step, path = checkpoints[-1]
        return (f"no checkpoint was saved now; --resume continues from step {step} ({path}), "
                "the steps after it are trained again")
    return (f"no checkpoint was saved and {output} has none: --resume (or --overwrite) starts "
            "from step 0")


def main():
    app()
