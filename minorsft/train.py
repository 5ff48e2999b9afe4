"""Stage 2: stream the cache, train the policy alone: setup -> fit -> save.

The trainer reads only the cache (token ids, answer masks, reference log-probs); it knows no input
format. Each optimizer step takes `batch_size` samples as micro-batches of `micro_batch_size` and
divides every micro-batch's summed loss by the step's sample count, so any split of the same
samples gives the same update (gradient accumulation is exact, not approximate).

Reliability (docs/reliability.md): `setup` refuses a cache whose fingerprints, schema or values
are wrong; before the first step a guard checks on a few rows that the policy's own log-probs
agree with the cached reference ones (step-0 m_theta near 0); checkpoints (model, optimizer,
scheduler, RNG states, steps done) are written atomically every `save_every` steps and on
Ctrl-C / SIGTERM, and `resume` continues from the latest so that the metrics from then on equal
those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from minorsft import __version__
from minorsft.cache import (
    CONTENT_HASH,
    CacheError,
    atomic_write_text,
    check_model_matches,
    content_hash,
    diff_settings,
    input_place,
    iter_rows,
    looks_like_cache,
    read_metadata,
    readable_weights,
    validate_values,
)
from minorsft.chat_templates import cached_chat_template, stop_at_end_of_turn
from minorsft.checkpoints import (
    OTHER_ROWS,
    RESUME_KEYS,
    StopRequest,
    TrainingInterrupted,
    is_fsdp_run,
    refuse_earlier_checkpoints,
    resume_from_checkpoint,
    save_checkpoint,
    trim_metrics,
)
from minorsft.compiling import compile_model, default_compile_skip
from minorsft.distributed import (
    STRATEGIES,
    World,
    all_reduce_sum,
    barrier,
    close_world,
    full_state_dict,
    init_world,
    no_gradient_sync,
    rank_device,
    rank_slice,
    wrap_policy,
)
from minorsft.folder_lock import folder_lock
from minorsft.heldout import (
    EVAL_METRICS,
    HeldoutSet,
    eval_every,
    evaluate,
    is_eval_step,
    read_heldout,
    read_records,
)
from minorsft.jsonl import json_safe
from minorsft.logprobs import final_logit_transform
from minorsft.loss import LOSS_NAMES, compute_loss
from minorsft.models import (
    ATTENTION_CHOICES,
    FP16_MIXED_PRECISION,
    MIXED_PRECISION,
    MIXED_PRECISIONS,
    QUANTIZATION_4BIT,
    ModelError,
    autocast_context,
    base_fingerprint,
    config_dropout,
    cpu_has_bf16,
    disable_dropout,
    dtype_name,
    is_first_rank,
    load_cache_model,
    load_model,
    pick_attention,
    pick_device,
    pick_precision,
    precision_name,
    to_device,
)
from minorsft.optim import MasterWeightsAdamW, make_optimizer, optimizer_order
from minorsft.packing import prepare_packing
from minorsft.progress import progress

# The best learning rate per loss in the paper's sweep (section 4, Figure 2).
PAPER_LR = {"minorsft": 2e-5, "sft-dpo": 2e-5, "sft": 1e-5}
# What shapes the adapters; without --lora-r there are none to shape.
LORA_SETTINGS = ("lora_alpha", "lora_dropout", "lora_target_modules")


@dataclass
class TrainConfig:
    """Settings of `minorsft train`; defaults follow the paper (section 4) where it gives one."""

    cache: str
    output: str
    model: str | None = None  # None: the model that wrote the cache
    loss: str = "minorsft"
    beta: float = 0.04
    lr: float | None = None  # None: the paper's best lr for the loss (PAPER_LR)
    batch_size: int = 64  # global batch, in samples
    micro_batch_size: int = 4
    epochs: int = 1
    max_steps: int | None = None
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: str = "auto"
    device: str = "auto"
    attention: str = "auto"
    gradient_checkpointing: bool = False
    # False: every dropout of the model is off while it trains, as the cache was scored (and as
    # TRL's DPOTrainer does by default): dropout noise in log pi_theta would enter r and the
    # MinorSFT coefficient. True: the model's own rates apply.
    keep_dropout: bool = False
    shuffle: bool = True
    shuffle_buffer: int = 4096
    allow_mismatch: bool = False
    log_every: int = 1
    strategy: str = "ddp"  # under torchrun: ddp or fsdp (FSDP2)
    cpu_offload: bool = False  # FSDP2 only: keep parameters and optimizer state on the CPU
    save_every: int | None = None  # checkpoint every N steps (and always on Ctrl-C / SIGTERM)
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the latest checkpoint under <output>/checkpoints
    overwrite: bool = False  # replace a run already in <output>
    step0_check: bool = True
    step0_tolerance: float | None = None  # nats per answer token; None: by dtype (STEP0_TOLERANCE)
    # Padding-free: each micro-batch in one row (see minorsft.packing). None: pack where it is
    # faster (flash-attn, or SDPA with per-sample attention) and the model passes the check.
    packing: bool | None = None
    lora_r: int = 0  # 0: full fine-tuning; >0: LoRA adapters of this rank (needs peft)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    merge_lora: bool = False  # also save the merged model in <output>/merged
    # QLoRA: the base model's linear layers in 4-bit NF4 (bitsandbytes), LoRA adapters on them;
    # the cache must have been scored under that 4-bit model (precompute --load-in-4bit)
    load_in_4bit: bool = False
    # bf16/fp16 weights: AdamW updates fp32 copies (see minorsft.optim); False: pure bf16/fp16
    master_weights: bool = True
    # torch.compile the decoder layers and the head's block arithmetic (minorsft.compiling).
    # None: on CUDA (COMPILE_BY_DEVICE)
    torch_compile: bool | None = None
    # Held-out rows (a precompute cache) scored every `eval_every` steps (None: about ten times
    # over the run) and before the first step, into eval_metrics.jsonl; `eval_rows`: the first N
    eval_cache: str | None = None
    eval_every: int | None = None
    eval_rows: int | None = None

    def __post_init__(self):
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSS_NAMES)}")
        if self.lr is None:
            self.lr = PAPER_LR[self.loss]
        # NaN passes every comparison's "not" and inf passes "> 0": either would train on
        # and save a model of NaN weights, or fail later with a misleading message.
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError("--lr must be a positive finite number")
        if not math.isfinite(self.beta):  # the metrics use beta with every loss
            raise ValueError("--beta must be a finite number")
        if self.loss != "sft" and self.beta <= 0:
            raise ValueError("--beta must be positive")
        if self.dtype in ("float16", "fp16"):
            # Without a loss scale, fp16 gradients underflow: the output head's g * softmax
            # entries (about 1e-3 * 1e-6) lie below fp16's smallest number and become 0.
            raise ValueError("--dtype float16 does not train: its small gradients round to 0 "
                             "in fp16 weights. Use fp16-mixed (fp32 weights, fp16 autocast and "
                             "loss scaling: GPUs without bf16, such as T4 and V100), bfloat16 "
                             "(GPUs since Ampere), bf16-mixed, or float32.")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("--batch-size and --micro-batch-size must be positive")
        # A micro-batch larger than the step (--batch-size 2 with the default 4) is the step.
        self.micro_batch_size = min(self.micro_batch_size, self.batch_size)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of "
                             f"--micro-batch-size {self.micro_batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("--warmup-ratio must lie in [0, 1)")
        if self.epochs < 1:
            raise ValueError("--epochs must be at least 1")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError("--weight-decay must be a finite number >= 0")
        # clip_grad_norm_ scales by max_norm / norm: a negative norm would turn the step around
        if not self.max_grad_norm > 0:
            raise ValueError("--max-grad-norm must be positive (inf turns clipping off)")
        if self.step0_tolerance is not None and not self.step0_tolerance > 0:
            raise ValueError("--step0-tolerance must be positive (--no-step0-check skips the "
                             "check)")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --output and --overwrite replaces "
                             "it: pass one of them")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0) \
                or not 0 <= self.lora_dropout < 1:
            raise ValueError("--lora-alpha must be positive and --lora-dropout lie in [0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("--max-steps must be positive")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"unknown --attention {self.attention!r}; choose one of "
                             f"{', '.join(ATTENTION_CHOICES)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose ddp or fsdp")
        if self.save_every is not None and self.save_every < 1:
            raise ValueError("--save-every must be positive")
        if self.keep_checkpoints < 1:
            raise ValueError("--keep-checkpoints must be at least 1")
        if (self.eval_every is not None and self.eval_every < 1) or \
                (self.eval_rows is not None and self.eval_rows < 1):
            raise ValueError("--eval-every and --eval-rows must be positive")
        if self.eval_cache is None and (given := [
                f"--{name.replace('_', '-')} {getattr(self, name)}"
                for name in ("eval_every", "eval_rows") if getattr(self, name) is not None]):
            raise ValueError(f"{', '.join(given)}: held-out evaluation needs --eval-cache (a "
                             "cache that `minorsft precompute` wrote from held-out rows)")
        if self.eval_cache is not None and Path(self.eval_cache).resolve() == \
                Path(self.cache).resolve():
            raise ValueError("--eval-cache is the training cache: held-out numbers need rows "
                             "the policy does not train on")
        if self.lora_r < 0 or (self.merge_lora and not self.lora_r):
            raise ValueError("--lora-r must be >= 0, and --merge-lora needs --lora-r > 0")
        if self.load_in_4bit and not self.lora_r:
            raise ValueError("--load-in-4bit trains LoRA adapters on the 4-bit base (QLoRA), "
                             "whose own weights cannot be trained: give --lora-r")
        if not self.lora_r and (given := [
                f"--{name.replace('_', '-')} {getattr(self, name)}" for name in LORA_SETTINGS
                if getattr(self, name) != getattr(TrainConfig, name)]):
            # else the run would train every weight while the user believes it trains adapters
            raise ValueError(f"{', '.join(given)}: LoRA settings apply with --lora-r > 0 (LoRA "
                             "off trains every weight); pass --lora-r or drop them")

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per rank per step: global batch / (micro-batch x world size)."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of "
                             f"--micro-batch-size {self.micro_batch_size} x {world_size} "
                             "processes")
        return self.batch_size // per_step


def epoch_rows(cache: Path, seed: int, shuffle: bool, buffer_size: int,
               epoch: int) -> Iterator[dict]:
    """One epoch of cache rows, shuffled through a buffer.

    A seeded shuffle buffer keeps memory bounded while still mixing neighbouring rows; the order
    is a pure function of (cache, seed, epoch), so a run can be reproduced.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    buffer: list[dict] = []
    for row in iter_rows(cache):
        if not shuffle:
            yield row
            continue
        buffer.append(row)
        if len(buffer) >= buffer_size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def global_batches(stream: Iterator[dict], batch_size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for row in stream:
        batch.append(row)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def training_batches(cache: Path, seed: int, shuffle: bool, buffer_size: int,
                     epochs: int | None, batch_size: int) -> Iterator[list[dict]]:
    """The steps' global batches, epoch after epoch (forever if `epochs` is None).

    Batches never span two epochs: an epoch of R rows is ceil(R / batch_size) steps, the last
    one short, as the step count promises; and no step holds one sample twice.
    """
    for epoch in range(epochs) if epochs is not None else itertools.count():
        yield from global_batches(epoch_rows(cache, seed, shuffle, buffer_size, epoch),
                                  batch_size)


def peak_rss_bytes() -> int | None:
    """This process's resident-set high-water mark in bytes; None where the OS does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB


def compute_precision(state: TrainState):
    """The context a forward pass runs in: bf16 autocast for bf16-mixed, else nothing."""
    return autocast_context(state.device, state.autocast)


def training_precision(state: TrainState) -> str:
    """The training precision as settings and logs name it: a dtype, or bf16-mixed."""
    return precision_name(state.dtype, state.autocast)


def _update_note(optimizer, dtype: torch.dtype, fsdp: bool, autocast: torch.dtype | None) -> str:
    """What precision the weight updates happen in (a line of the start-up log)."""
    if autocast is not None:
        note = ("fp32 weights and updates, forward and backward under "
                f"{dtype_name(autocast)} autocast")
        if autocast == torch.float16:
            note += ", dynamic loss scaling (a step whose gradients overflow is skipped)"
        return note
    if fsdp and dtype != torch.float32:
        return "fp32 weight updates (FSDP's fp32 master weights)"
    if isinstance(optimizer, MasterWeightsAdamW):
        return f"AdamW on fp32 master weights of the {dtype_name(dtype)} parameters"
    low = {p.dtype for group in optimizer.param_groups for p in group["params"]} - {
        torch.float32}
    if low:
        names = ", ".join(sorted(dtype_name(d) for d in low))
        return f"pure {names} AdamW (--no-master-weights: updates under half a step are lost)"
    return "fp32 weight updates"


def _compile_layers(model, requested: bool | None, device: torch.device, fsdp: bool) -> str:
    """Compile the decoder layers and the head's block arithmetic if asked, or unasked where
    minorsft.compiling says so."""
    if requested is False:
        return "eager layers (--no-compile)"
    if requested is None:
        reason = "FSDP" if fsdp else default_compile_skip(device)
        if reason is not None:
            return f"eager layers ({reason})"
    elif fsdp:
        raise ValueError("--compile is for one process or DDP; train FSDP with --no-compile")
    count = compile_model(model)
    return (f"{count} decoder layers and the output head's blocks compiled (the first step "
            "compiles them)")


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the peak lr, then linear decay to zero (the paper's schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainState:
    model: torch.nn.Module  # the transformers model (unwrapped)
    policy: torch.nn.Module  # what is called in training: answer log-probs, maybe DDP/FSDP
    world: World
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    total_steps: int
    metadata: dict
    model_path: str
    packing: bool  # micro-batches run as packed rows (decided in setup from config.packing)
    start_step: int = 0  # steps already done (from a checkpoint)
    autocast: torch.dtype | None = None  # bf16/fp16-mixed: fp32 weights, forward under autocast
    # fp16-mixed: the dynamic loss scale that keeps fp16 gradients from rounding to 0
    scaler: torch.amp.GradScaler | None = None
    # the model's own non-zero dropout rates (turned off unless --keep-dropout)
    model_dropout: dict = field(default_factory=dict)
    config_dropout: dict = field(default_factory=dict)  # the config's own, for saving
    heldout: HeldoutSet | None = None  # --eval-cache's rows
    heldout_seconds: dict = field(default_factory=dict)  # steps done -> its evaluation's time
    # the template's end of turn was added to the generation config's stop tokens (saved beside
    # LoRA adapters too, for a merge from them)
    stops_added: bool = False


# Versions that changed which tokens of some chats are answer, and what they changed: a cache
# written before one of them may hold other answer masks than precompute writes now.
ANSWER_SPAN_FIXES = (
    ("0.2.0", "chats that begin with an assistant turn (their answer took in the template's "
              "default system prompt), and templates that end a turn with another marker than "
              "the eos token (the answer took in the newline after it)"),
    ("0.4.0", "templates that write a space before the answer, such as Llama-2's, Mistral's "
              "and DeepSeek's (the answer's first token was left out: for a one-word answer, "
              "the word itself), and templates that write the eos token once after the last "
              "turn, such as Phi-3's (multi-turn chats were rejected; the last answer took in "
              "the newline and the eos token); multi-turn chats under templates that render a "
              "turn otherwise when more follows, such as Qwen3's, were rejected, and so were "
              "answers with <think> reasoning that such templates move"),
)


def _old_answer_span_note(version: str | None) -> str | None:
    """A note for caches written before one of ANSWER_SPAN_FIXES: some answer masks differ."""
    try:
        written = _version_tuple(version)
    except ValueError:  # no version recorded, or not a plain one
        return None
    missed = [(fixed, what) for fixed, what in ANSWER_SPAN_FIXES
              if written < _version_tuple(fixed)]
    if not missed:
        return None
    fixes = "; ".join(f"{fixed} fixed the answer span of {what}" for fixed, what in missed)
    return (f"this cache was written by minorsft {version}. minorsft {fixes}. If your data or "
            "template has any of these, run precompute again.")


def _version_tuple(version: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in str(version).split(".")[:3])


# What `train` writes into --output (and --overwrite removes): the model (full or LoRA) and its
# configs, the merged model, the metrics, the run's config and the checkpoints. (The tokenizer's
# files are written again by every run.) Nothing else is touched.
RUN_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
             "config.json",
             "generation_config.json", "adapter_model.safetensors", "adapter_config.json",
             "metrics.jsonl", EVAL_METRICS, "run_config.json")
RUN_FOLDERS = ("checkpoints", "merged")


def check_output(config: TrainConfig, is_main: bool, model_dir: str | None = None) -> None:
    """Refuse an --output that would lose or mix something, before anything is loaded: a file,
    the cache itself, the model's own folder, a folder with a model that no minorsft run wrote,
    or a finished run (replaced with --overwrite, continued with --resume)."""
    output, cache = Path(config.output), Path(config.cache)
    if output.is_file():
        raise ValueError(f"--output {output} is a file; train writes a folder there: choose "
                         "another --output")
    if output.resolve() == cache.resolve():
        raise ValueError(f"--output {output} is the cache: choose another --output")
    if output.is_dir() and looks_like_cache(output):
        # (the --eval-cache, or any other: a model and run files among its parts)
        raise ValueError(f"--output {output} is a minorsft cache (it holds a manifest of "
                         "parts): train would write its model and run files among them; "
                         "choose another --output")
    if model_dir and Path(model_dir).is_dir() and (
            Path(model_dir).resolve().is_relative_to(output.resolve())):
        # (also a model inside it: a previous run's merged/ model, which --overwrite removes)
        raise ValueError(f"--output {output} holds the model being trained ({model_dir}): "
                         "choose another --output")
    finished = (output / "run_config.json").exists()
    is_run = finished or (output / "checkpoints").is_dir()
    if not is_run and output.is_dir() and (found := _model_files(output)):
        if _died_while_saving(output):
            # A run stopped while it saved its model (run_config.json is written last).
            if not (config.overwrite or config.resume):
                raise ValueError(
                    f"--output {output} holds a run that did not finish saving "
                    f"({', '.join(found[:3])} and metrics.jsonl, no run_config.json or "
                    "checkpoints): pass --overwrite (or --resume) to train it again from "
                    "step 0, or choose another --output")
        else:
            raise ValueError(
                f"--output {output} holds {', '.join(found[:3])} but no minorsft run (no "
                "run_config.json or checkpoints): train would write over them; choose another "
                "--output (or, if a crashed run left them, delete them)")
    if finished and not (config.resume or config.overwrite):
        raise ValueError(f"{output} holds a finished run (run_config.json): pass --overwrite to "
                         "replace it, or choose another --output")
    refuse_earlier_checkpoints(config)  # (a stopped run: minutes of model loading saved)


def _model_files(output: Path) -> list[str]:
    """The files of a run's model in `output` (not its metrics, which a crashed run leaves)."""
    return sorted(f.name for pattern in RUN_FILES if not pattern.endswith("metrics.jsonl")
                  for f in output.glob(pattern))


def _died_while_saving(output: Path) -> bool:
    """Whether `output` holds a run stopped while it saved its model: its metrics (minorsft's:
    the first line is a step's record) and model files, but neither run_config.json (written
    last) nor checkpoints."""
    if (output / "run_config.json").exists() or (output / "checkpoints").is_dir():
        return False
    try:
        with (output / "metrics.jsonl").open(encoding="utf-8") as log:
            first = json.loads(log.readline())
    except (OSError, ValueError):
        return False
    return (isinstance(first, dict) and {"step", "loss", "m_theta"} <= first.keys()
            and bool(_model_files(output)))


def clear_output(config: TrainConfig, is_main: bool, console: Console | None = None) -> None:
    """With --overwrite, remove the earlier run from --output: only once this run has loaded
    and passed its checks, so that a mistake found on the way (a wrong option, a failed step-0
    check) leaves the earlier run as it was."""
    output = Path(config.output)
    # --resume of a run that died while saving, with no checkpoint, starts again from step 0:
    # its files go as with --overwrite (a LoRA run must not leave a full model's files behind)
    again = config.resume and _died_while_saving(output)
    if again and is_main and console is not None:
        console.print(f"--resume: {output} holds a run that died while saving its model "
                      f"({', '.join(_model_files(output)[:3])}, no checkpoint): training it "
                      "again from step 0, in place of those files", markup=False)
    if (config.overwrite or again) and is_main and output.is_dir():
        if (output / "adapter_config.json").exists():
            (output / "README.md").unlink(missing_ok=True)  # the model card peft writes
        for pattern in RUN_FILES:
            for file in output.glob(pattern):
                file.unlink()
        for folder in RUN_FOLDERS:
            shutil.rmtree(output / folder, ignore_errors=True)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (--gradient-checkpointing), with
    torch's non-reentrant checkpoint; under the name this transformers has (the later releases
    call it activation checkpointing, and warn at the old name)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def setup(config: TrainConfig, console: Console) -> TrainState:
    world = init_world(config.device)
    cache = Path(config.cache)
    metadata = read_metadata(cache)
    check_output(config, world.is_main, config.model or metadata.get("model_path"))
    if config.batch_size % world.world_size == 0:
        # as in TrainConfig: a micro-batch larger than a process's share of the step is that
        # share (--batch-size 4 with the default micro-batch of 4 on 2 processes: 2)
        config.micro_batch_size = min(config.micro_batch_size,
                                      config.batch_size // world.world_size)
    accumulation = config.accumulation_steps(world.world_size)
    if not int(metadata.get("rows") or 0):
        raise CacheError(f"{cache}: the cache has no rows (were they all rejected? see its "
                         "_rejects.jsonl): nothing to train on")
    metadata[CONTENT_HASH] = validate_values(cache)  # (its hash: what a resume must find)
    heldout = None
    if config.eval_cache is not None:  # (before minutes of model loading, as the cache's checks)
        heldout, note = read_heldout(Path(config.eval_cache), cache, config.eval_rows)
        if note and world.is_main:
            console.print(f"note: {note}", highlight=False, markup=False)
    if config.strategy == "fsdp" and not world.distributed and world.is_main:
        console.print("note: --strategy fsdp applies under torchrun with several processes; "
                      "this is one process, trained without it", highlight=False)
    elif config.cpu_offload and config.strategy != "fsdp" and world.is_main:
        console.print("note: --cpu-offload applies under --strategy fsdp only; ignored",
                      highlight=False)
    model_name, model_path, tokenizer = load_cache_model(config.model, metadata, cache)
    if not config.allow_mismatch:
        check_model_matches(metadata, model_path, tokenizer, cache)
    quantization = QUANTIZATION_4BIT if config.load_in_4bit else None
    if (cached := metadata.get("quantization")) != quantization:
        message = _quantization_mismatch(cached, cache)
        if not config.allow_mismatch:
            raise CacheError(message)
        if world.is_main:
            console.print(f"note: {message} (--allow-mismatch: trained all the same)",
                          highlight=False, markup=False)
    if world.is_main and (note := _old_answer_span_note(metadata.get("minorsft_version"))):
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    torch.manual_seed(config.seed)
    device = pick_device(rank_device(world, config.device))
    # FSDP2 keeps fp32 master weights and computes in `dtype` through its mixed-precision policy.
    fsdp = world.distributed and config.strategy == "fsdp"
    mixed = config.dtype in MIXED_PRECISIONS
    if mixed and fsdp:
        raise ValueError(f"--dtype {config.dtype} is for one process or DDP (--strategy ddp); "
                         "FSDP computes in bf16 on fp32 master weights already: use --dtype "
                         "bfloat16 on GPUs that have bf16")
    if quantization and fsdp:
        raise ValueError("--load-in-4bit trains in one process or under --strategy ddp; FSDP "
                         "does not shard 4-bit weights here")
    dtype, autocast = pick_precision(config.dtype, device)
    load_dtype = torch.float32 if fsdp else dtype
    if config.attention == "flex_attention" and device.type != "cuda":
        # torch's flex attention has no CPU backward: training would fail at the first step
        raise ValueError("--attention flex_attention trains only on CUDA GPUs; use sdpa")
    model = load_model(model_path, load_dtype, device, pick_attention(config.attention, device),
                       quantization)
    if quantization:
        # torch warns of "silently incorrect" gradients through bitsandbytes' 4-bit matrix-
        # vector op, which computes them right (tests/test_qlora.py)
        warnings.filterwarnings("ignore", message=r"bitsandbytes::gemv_4bit: an autograd "
                                "kernel was not registered")
    # (its own template too: a base model's, Qwen2.5's say, ends turns with <|im_end|> while
    # its generation config stops at <|endoftext|> only)
    stops = copy.deepcopy(model.generation_config.eos_token_id)
    if (note := stop_at_end_of_turn(model, tokenizer)) and world.is_main:
        console.print(f"note: {note}", highlight=False, markup=False)
    # Decided now, before packing, compiling or wrapping change the model: whether its logits
    # are its output head's (the blocked head's path) or must come from its own forward.
    final_logit_transform(model)
    config_rates = config_dropout(model.config)  # to write back into the saved model's config
    rates = disable_dropout(model, turn_off=not config.keep_dropout)
    dropout_note = ""
    if rates and not config.keep_dropout:
        dropout_note = ("; dropout off (the model's " + ", ".join(
            f"{name} {'/'.join(f'{rate:g}' for rate in values)}"
            for name, values in rates.items()) + "; --keep-dropout keeps it)")
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    packing, packing_note = prepare_packing(model, config.packing)
    # (bitsandbytes' 4-bit layers under torch.compile are not tested here: off unless asked)
    compile_note = _compile_layers(model, False if quantization and config.torch_compile is None
                                   else config.torch_compile, device, fsdp)
    if config.lora_r:
        from minorsft.lora import apply_lora

        model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout,
                           config.lora_target_modules, merge=config.merge_lora)
    lora_note = _lora_note(config, model) if config.lora_r else ""
    model.train()
    offload = config.cpu_offload
    if offload and fsdp and device.type == "cpu":  # (FSDP's offload wants an accelerator)
        offload = False
        if world.is_main:
            console.print("note: --cpu-offload moves FSDP's state off a GPU; this run computes "
                          "on the CPU, where it is already: ignored", highlight=False)
    policy = wrap_policy(model, world, config.strategy, device, dtype if fsdp else None,
                         offload)
    if world.distributed:
        # Every rank built the same model from the same seed (FSDP does not broadcast it); from
        # here each draws its own dropout masks, as different samples should get.
        torch.manual_seed(config.seed + world.rank)
    rows = int(metadata["rows"])
    steps_per_epoch = math.ceil(rows / config.batch_size)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer([p for _, p in optimizer_order(trainable, config.weight_decay)],
                               config.lr, config.weight_decay, config.master_weights)
    warmup_steps = int(config.warmup_ratio * total_steps)
    scheduler = linear_schedule(optimizer, warmup_steps, total_steps)
    console.print(
        f"[bold]minorsft train[/] loss={config.loss} beta={config.beta} lr={config.lr} "
        f"model={escape(str(model_name))} cache={escape(str(cache))} ({rows} rows, engine "
        f"{metadata.get('engine')}, "
        f"{metadata.get('dtype')}{', 4-bit ' + quantization if quantization else ''}) "
        f"device={device} dtype={precision_name(dtype, autocast)}"
        + (f" chat-template={escape(str(metadata['chat_template'].get('given')))} (the "
           "cache's)" if cached_chat_template(metadata) else "") + "\n"
        f"global batch {config.batch_size} = micro-batch {config.micro_batch_size} x "
        f"accumulation {accumulation} x {world.world_size} process(es)"
        + (f" ({config.strategy})" if world.distributed else "")
        + f"; {total_steps} step{'s' * (total_steps != 1)}, {warmup_steps} warm-up; "
        f"{escape(packing_note)}; "
        f"{escape(compile_note)}; "
        + _update_note(optimizer, dtype, fsdp, autocast) + escape(dropout_note)
        + escape(lora_note)
    )
    if config.batch_size > rows and world.is_main:  # ("global batch 64" read as 64 a step)
        console.print(f"note: --batch-size {config.batch_size} is more than the cache's {rows} "
                      f"rows: a step's batch never spans two epochs, so each step takes all "
                      f"{rows}", highlight=False)
    if (device.type == "cpu" and world.is_main and torch.bfloat16 in (dtype, autocast)
            and not cpu_has_bf16()):
        # (measured: docs/performance.md 2b, on a CPU without them bf16-mixed was >16 x slower)
        console.print("note: this CPU has no bf16 instructions (AVX512-BF16 or AMX): bf16 "
                      "math is emulated and much slower than float32 here (docs/performance.md"
                      " 2b); --dtype float32 is the faster choice on it", highlight=False)
    if device.type == "cpu" and config.dtype == "auto" and world.is_main and cpu_has_bf16():
        console.print(f"hint: this CPU has bf16 instructions: --dtype {MIXED_PRECISION} (bf16 "
                      "autocast on fp32 weights) trained SmolLM2 at 1.89 x the tokens/s of "
                      "float32 on such a CPU (docs/performance.md)", highlight=False)
    # fp16's smallest numbers are ~6e-8: the output head's gradient entries (about 1e-3 x 1e-6)
    # would round to 0 unscaled. The scaler multiplies the loss before backward and divides the
    # gradients back before clipping, skipping a step whose gradients overflowed.
    scaler = torch.amp.GradScaler(device.type) if autocast == torch.float16 else None
    state = TrainState(model, policy, world, tokenizer, optimizer, scheduler, device, dtype,
                       total_steps, metadata, model_path, packing, autocast=autocast,
                       scaler=scaler, model_dropout=rates, config_dropout=config_rates,
                       heldout=heldout,
                       stops_added=model.generation_config.eos_token_id != stops)
    resume_from_checkpoint(state, config, console)
    return state


METRIC_SUMS = ("loss", "nll", "m_theta", "coefficient", "reward", "policy_logps", "ref_logps")


def train_step(state: TrainState, config: TrainConfig, rows: list[dict]) -> dict:
    """One optimizer step over `rows`, the step's global batch. Returns the step's metrics.

    Every micro-batch's loss is its summed per-sample loss divided by the step's global sample
    count (times the world size, which DDP/FSDP divide back out when they average gradients), so
    the update is the gradient of the mean over the step however it is split.
    """
    world, device = state.world, state.device
    pad_id = state.tokenizer.pad_token_id
    count, size = len(rows), config.micro_batch_size
    local = rank_slice(rows, world)
    # Every rank runs as many micro-batches as the fullest one: DDP and FSDP communicate in each
    # backward (FSDP in each forward too), so a rank with fewer, which a short last batch gives
    # (3 rows on 2 ranks at micro-batch 1: 2 and 1), would leave the others waiting forever. The
    # missing ones run the batch's first row at weight 0: they take part and change nothing.
    fullest = -(-count // world.world_size)
    micro_batches = [(local[i: i + size], 1.0) for i in range(0, len(local), size)]
    micro_batches += [(rows[:1], 0.0)] * (-(-fullest // size) - len(micro_batches))
    # The metrics stay on the device until the step's optimizer kernels are queued: one copy to
    # the host per step (a copy waits for the device, which then idles while Python goes on).
    sums = torch.zeros(len(METRIC_SUMS), dtype=torch.float64, device=device)
    tokens = 0
    for index, (micro, weight) in enumerate(micro_batches):
        ref_logps = to_device(torch.tensor([r["ref_logps"] for r in micro]), device)
        num_tokens = to_device(torch.tensor([r["num_tokens"] for r in micro]), device)
        with no_gradient_sync(state.policy, sync=index == len(micro_batches) - 1):
            with compute_precision(state):
                policy_logps, micro_tokens = state.policy(micro, pad_id, device, state.packing)
                out = compute_loss(config.loss, policy_logps, ref_logps, num_tokens, config.beta)
            step_loss = out.losses.sum() * (weight * world.world_size / count)
            (state.scaler.scale(step_loss) if state.scaler else step_loss).backward()
        policy_detached = policy_logps.detach()
        sums += weight * torch.stack([  # in METRIC_SUMS order
            out.losses.detach().sum(),
            # Per-token NLL of the answers (raw SFT's loss), comparable across all three losses.
            (-policy_detached / num_tokens).sum(),
            out.deviation.sum(), out.coefficient.sum(), out.reward.sum(),
            policy_detached.sum(), ref_logps.sum(),
        ]).double()
        tokens += int(weight * micro_tokens)
    if state.scaler:
        state.scaler.unscale_(state.optimizer)  # clipping sees the true gradients
    grad_norm = torch.nn.utils.clip_grad_norm_(state.policy.parameters(), config.max_grad_norm)
    lr = state.scheduler.get_last_lr()[0]
    if state.scaler:
        scale = state.scaler.get_scale()
        state.scaler.step(state.optimizer)  # skipped where the gradients hold inf or NaN
        state.scaler.update()
        skipped = state.scaler.get_scale() < scale  # the scale shrinks after a skipped step
    else:
        state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
        grad_norm = grad_norm.full_tensor()
    # Summed over ranks on the device, then one copy to the host (with the gradient norm, which
    # every rank already has whole).
    tokens_here = to_device(torch.tensor([tokens], dtype=torch.float64), device)
    totals = all_reduce_sum(torch.cat([sums, tokens_here]), world)
    *totals, grad_norm = torch.cat([totals, grad_norm.reshape(1).to(totals)]).tolist()
    metrics = {key: value / count for key, value in zip(METRIC_SUMS, totals, strict=False)}
    metrics.update(lr=lr, grad_norm=grad_norm, samples=count, tokens=int(totals[-1]),
                   rank_tokens=tokens)
    if state.scaler:
        metrics.update(loss_scale=scale, skipped_step=skipped)
    if device.type == "cuda":  # what users size their GPUs by: this rank's peak so far
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    elif (peak := peak_rss_bytes()) is not None:  # a CPU: the process's resident peak
        metrics["peak_rss_gib"] = peak / 2**30
    return metrics


def _describe_training(task: dict) -> str:
    return (f"training {task['completed']:.0f}/{task['total']} steps  loss {task['loss']:.4f}  "
            f"m_theta {task['m_theta']:+.2e}  coef {task['coef']:.3f}  "
            f"{task['tok_s']:.0f} tok/s")


def fit(state: TrainState, config: TrainConfig, console: Console,
        stop: StopRequest) -> list[dict]:
    """Train from `state.start_step` to the last step, logging metrics and saving checkpoints;
    `stop` (entered by the caller, to cover the final save too) turns Ctrl-C and SIGTERM into a
    checkpoint after the current step."""
    output = Path(config.output)
    main = state.world.is_main
    if main:
        output.mkdir(parents=True, exist_ok=True)
    epochs = None if config.max_steps else config.epochs
    batches = training_batches(Path(config.cache), config.seed, config.shuffle,
                               config.shuffle_buffer, epochs, config.batch_size)
    history = []
    started = time.perf_counter()
    first = state.start_step
    heldout = _HeldoutLog(state, config, console, output, first)
    if first >= state.total_steps:  # resumed at the end: no bar of 3/3 steps with loss nan
        heldout.start(first)  # (a stop at the last step skipped its evaluation)
        return history
    batches = islice(batches, first, None)  # the stream is a pure function of (cache, seed)
    columns = (TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  m_theta {task.fields[m_theta]:+.2e}  "
                          "coef {task.fields[coef]:.3f}  {task.fields[tok_s]:.0f} tok/s"),
               TimeElapsedColumn())
    metrics_path = output / "metrics.jsonl" if main else Path(os.devnull)
    # A resumed run's `elapsed` goes on from its checkpoint's (the time it was stopped not
    # counted), so that wall-clock curves have no jump back to 0.
    elapsed_before = trim_metrics(metrics_path, first) if main else 0.0
    with metrics_path.open("a" if first else "w", encoding="utf-8") as log, \
            progress(console, columns, _describe_training, disable=not main) as bar:
        task = bar.add_task("train", total=state.total_steps, completed=first,
                            loss=float("nan"), m_theta=0.0, coef=0.5, tok_s=0.0)
        heldout.start(first)
        for step, rows in zip(range(first, state.total_steps), batches, strict=False):
            step_started = time.perf_counter()
            metrics = train_step(state, config, rows)
            seconds = time.perf_counter() - step_started
            metrics = {"step": step, **metrics, "tokens_per_s": metrics["tokens"] / seconds,
                       "rank_tokens_per_s": metrics["rank_tokens"] / seconds,
                       "world_size": state.world.world_size,
                       "step_seconds": seconds,
                       "elapsed": elapsed_before + time.perf_counter() - started}
            check_finite(metrics, step)
            if metrics.get("skipped_step") and main and step > first + 20:
                # the first steps find the scale (it starts at 2**16); later, skips are news
                console.print(f"note: step {step} skipped: its fp16 gradients overflowed (loss "
                              f"scale now {state.scaler.get_scale():g})", highlight=False)
            history.append(metrics)
            if step % config.log_every == 0 or step == state.total_steps - 1:
                # (a skipped fp16 step's gradient norm is inf: null, which JSON has)
                log.write(json.dumps(json_safe(metrics), allow_nan=False) + "\n")
                log.flush()
            bar.update(task, advance=1, loss=metrics["loss"], m_theta=metrics["m_theta"],
                            coef=metrics["coefficient"], tok_s=metrics["tokens_per_s"])
            done = step + 1
            stopping = stop.agreed(state)
            # (a stop goes to its checkpoint at once, and one that came during an evaluation
            # right after it; the resumed run makes a skipped evaluation first)
            if not stopping and heldout.after(done):
                stopping = stop.agreed(state)
            if stopping or (config.save_every and done % config.save_every == 0):
                path = save_checkpoint(state, config, done)
                # a signal that came during the save: this checkpoint is the one to stop at
                # (another step and save may not fit in the time torchrun or a scheduler gives)
                if stopping or (done < state.total_steps and stop.agreed(state)):
                    raise TrainingInterrupted(done, path)
    return history


class _HeldoutLog:
    """--eval-cache's evaluations during `fit`: the policy scored on the held-out rows every
    few steps, each record a line of <output>/eval_metrics.jsonl (main process) and a line on
    the console. Does nothing without --eval-cache."""

    def __init__(self, state: TrainState, config: TrainConfig, console: Console, output: Path,
                 first: int):
        self.state, self.config, self.console = state, config, console
        self.every = eval_every(config.eval_every, state.total_steps)
        self.path = output / EVAL_METRICS
        self.resumed_record = False
        if state.world.is_main:
            # a resumed run keeps the records up to its checkpoint's step, evaluated there
            if first:
                trim_metrics(self.path, first + 1)
                kept = read_records(self.path)
                self.resumed_record = any(record.get("step") == first for record in kept)
                if kept and not state.heldout:
                    console.print(f"note: {self.path} holds held-out evaluations up to step "
                                  f"{kept[-1].get('step')}, and this run has no --eval-cache: "
                                  "its curve ends there (resume with the same --eval-cache to "
                                  "go on with it)", highlight=False, markup=False)
                if kept and state.heldout and \
                        kept[-1].get("heldout_set") != state.heldout.set_hash:
                    console.print(f"note: {self.path} holds evaluations on another held-out "
                                  f"set (other rows or reference log-probs: "
                                  f"{kept[-1].get('rows')} rows, up to step "
                                  f"{kept[-1].get('step')}); this run's go after them",
                                  highlight=False, markup=False)
            else:
                self.path.unlink(missing_ok=True)
        if state.heldout:
            # (every rank evaluates, or none: FSDP needs them all in each forward; rank 0 knows)
            found = to_device(torch.tensor([float(self.resumed_record)]), state.device)
            self.resumed_record = bool(all_reduce_sum(found, state.world).item())

    def start(self, first: int) -> None:
        """Before the first step of this session: say when the policy is evaluated, and make
        the starting point of the curves, or, for a run resumed from a checkpoint that a stop
        request wrote before its evaluation, that evaluation."""
        state = self.state
        if not state.heldout:
            return
        if state.world.is_main:
            steps = [done for done in range(first + self.resumed_record, state.total_steps + 1)
                     if is_eval_step(done, self.every, state.total_steps)]
            if len(steps) > 6:
                steps = [*steps[:3], "...", *steps[-2:]]
            self.console.print(
                f"held-out: {len(state.heldout.ref_logps)} rows of {self.config.eval_cache}, "
                f"evaluated after steps {', '.join(map(str, steps))}", highlight=False,
                markup=False)
        if not self.resumed_record:
            self.after(first)

    def after(self, done: int) -> bool:
        """Evaluate the policy after `done` steps if that is an evaluation step; whether it
        was."""
        state = self.state
        if not state.heldout or not is_eval_step(done, self.every, state.total_steps):
            return False
        record = evaluate(lambda rows: policy_logps(state, self.config, rows, split=True),
                          state.heldout, done)
        state.heldout_seconds[done] = record["seconds"]
        if not state.world.is_main:
            return True
        with self.path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self.console.print(
            f"held-out after {done} step{'s' * (done != 1)}: NLL per token "
            f"{record['nll_per_token']:.4f}, m_theta {record['m_theta']:+.3e} "
            f"({record['rows']} rows, {record['seconds']:.1f} s)", highlight=False)
        return True


def _quantization_mismatch(cached: str | None, cache: Path) -> str:
    """Why a cache scored with other quantization than the run's is not its reference: the
    reference must be the model the policy starts from (else r is not 0 at step 0)."""
    if cached:
        return (f"{cache} was scored under the model in 4-bit ({cached}), the base of a QLoRA "
                "run: train with --load-in-4bit --lora-r N, or score the cache without "
                "--load-in-4bit")
    return (f"--load-in-4bit: {cache} was scored under the model as it is, not in 4-bit; the "
            "reference must be the model the policy starts from: score it with `minorsft "
            "precompute --load-in-4bit`")


def check_finite(metrics: dict, step: int) -> None:
    """Stop at a step whose loss or gradient norm is NaN or infinite: its update (or the next)
    has made or would make the weights NaN, and nothing after it would be worth saving."""
    for name in ("loss", "grad_norm"):
        if math.isfinite(metrics[name]):
            continue
        if name == "grad_norm" and metrics.get("skipped_step"):
            continue  # fp16-mixed: the loss scaler skipped this step and lowered its scale
        if "skipped_step" in metrics:  # fp16-mixed: the scaler saw to the gradients
            cause = ("an activation overflowed fp16's range (65504) in the forward pass; train "
                     "in float32, or in bf16-mixed where the GPU has bf16")
        elif step == 0:
            cause = ("no update had happened yet: the model or the cache gives non-finite "
                     "values (check the step-0 line above)")
        else:
            cause = "the updates diverged; train again with a lower --lr"
        raise FloatingPointError(f"{name} became {metrics[name]} at step {step}: {cause}")


def save(state: TrainState, config: TrainConfig) -> Path:
    """A folder that transformers and vLLM load as is, plus the run's config."""
    output = Path(config.output)
    weights = full_state_dict(state.policy, state.world, config.strategy)  # collective
    if not state.world.is_main:
        return output
    state.model.config.use_cache = True
    for name, rate in state.config_dropout.items():  # off while training, the model's own
        setattr(state.model.config, name, rate)
    if config.lora_r:
        from minorsft.lora import save_lora

        # Under FSDP the live adapters are shards: save the gathered ones, and merge them into
        # the base read from disk again (the sharded model cannot merge in place); a 4-bit
        # base too, so that the merged model has the base's own weights, not 4-bit ones.
        sharded = is_fsdp_run(state, config)
        save_lora(state.model, output, config.merge_lora, state.tokenizer,
                  state_dict=weights if sharded else None,
                  base_path=state.model_path if sharded or config.load_in_4bit else None,
                  dtype=state.dtype,
                  generation_config=state.model.generation_config
                  if state.stops_added else None)
    elif is_fsdp_run(state, config) and state.dtype != torch.float32:
        # FSDP trained fp32 weights computing in --dtype: saved in that dtype, as a one-process
        # run saves its bf16 weights (rounded from its fp32 master weights), not at twice the
        # size. save_pretrained names the live (fp32) parameters' dtype in config.json.
        weights = {name: value.to(state.dtype) if value.is_floating_point() else value
                   for name, value in weights.items()}
        state.model.save_pretrained(output, state_dict=weights, safe_serialization=True)
        state.model.config.dtype = dtype_name(state.dtype)
        state.model.config.save_pretrained(output)
    else:
        state.model.save_pretrained(output, state_dict=weights, safe_serialization=True)
    state.tokenizer.save_pretrained(output)
    readable_weights(output)
    run_config = {"config": asdict(config), "minorsft_version": __version__,
                  "cache_metadata": state.metadata, "model_path": state.model_path,
                  "total_steps": state.total_steps,
                  "dtype": training_precision(state), "device": str(state.device),
                  "world_size": state.world.world_size}
    if config.lora_r:  # what eval and a later merge check the base they put the adapters on by
        run_config["base_fingerprint"] = base_fingerprint(state.model_path)
    # whole or not at all: it marks the run finished, and plot and --resume read it
    atomic_write_text(output / "run_config.json", json.dumps(run_config, indent=2))
    return output


def _finished_run(config: TrainConfig) -> dict | None:
    """The run config of a finished run in --output (run_config.json, written last), or None.
    Its checkpoints are usually from before the last step (--save-every), and resuming one
    would train the last steps again. Refuses a finished run of other settings, as resuming a
    checkpoint would."""
    output = Path(config.output)
    try:
        run_config = json.loads((output / "run_config.json").read_text())
        saved = dict(run_config["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    now = asdict(config)
    if saved.get("dtype") != config.dtype and "dtype" in run_config:
        # Compared as trained, not as spelled: "auto" on a CPU is float32.
        saved["dtype"] = run_config["dtype"]
        now["dtype"] = precision_name(*pick_precision(config.dtype, pick_device(config.device)))
    keys = [key for key in RESUME_KEYS if key != "model" and key in now and key in saved]
    changed = diff_settings({key: saved[key] for key in keys}, {key: now[key] for key in keys})
    changed += _finished_run_inputs_changed(run_config, config)
    if changed:
        raise ValueError(f"{output} holds a finished run with other settings (finished run -> "
                         "this run):\n  "
                         + "\n  ".join(changed) + "\n--overwrite replaces it; or choose another "
                         "--output")
    return run_config


def _lora_note(config: TrainConfig, model) -> str:
    """What the start-up line says of LoRA (it said nothing: a LoRA run looked like full
    fine-tuning until the adapters were saved). Counted before FSDP shards the tensors."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # (a 4-bit weight's numel counts its packed bytes, two weights each: its shape is kept)
    total = sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None
                else p.numel() for p in model.parameters())
    return (f"; LoRA r={config.lora_r} alpha={config.lora_alpha:g} on "
            f"{config.lora_target_modules}{' of a 4-bit NF4 base' * config.load_in_4bit}: "
            f"{trained:,} of {total:,} parameters trained "
            f"({100 * trained / total:.2f} %)"
            + (", merged model saved at the end" if config.merge_lora else ""))


def _merge_finished_lora_run(config: TrainConfig, run_config: dict, console: Console) -> bool:
    """--resume --merge-lora on a finished LoRA run without a merged model (trained without
    --merge-lora): merge its saved adapters now, instead of doing nothing. Whether it merged."""
    output = Path(config.output)
    if not (config.merge_lora and (output / "adapter_config.json").exists()
            # (a merged/ without weights: one a kill cut short before 0.4.1 wrote it whole)
            and not any((output / "merged").glob("*.safetensors")) and is_first_rank()):
        return False  # (under torchrun, one process merges: the others have nothing to do)
    from minorsft.lora import merge_saved_adapters
    from minorsft.models import load_tokenizer, lora_base

    base = lora_base(output, run_config,
                     moved_to=config.model if _base_moved(run_config, config) else None,
                     moved_option="--model (with --resume --merge-lora)")
    # in the dtype the run's weights trained in (bf16-mixed and fp16-mixed: fp32), as a merge
    # at the end of that training would have written it
    trained = run_config.get("dtype")
    dtype = pick_precision(trained, torch.device("cpu"))[0] if trained else "auto"
    merged = merge_saved_adapters(output, base, load_tokenizer(str(output), option="--output"),
                                  dtype)
    console.print(f"merged the finished run's adapters with {base} into {merged}", markup=False)
    return True


def _finished_run_inputs_changed(run_config: dict, config: TrainConfig) -> list[str]:
    """The cache and model of a finished run that this run's differ from, as lines."""
    from minorsft.cache import read_metadata
    from minorsft.models import resolve_model

    changed = []
    saved_cache = run_config.get("cache_metadata") or {}
    try:
        cache = read_metadata(Path(config.cache))
    except CacheError:
        # A finished run needs no cache: a job script that passes --resume on every start
        # still gets "nothing to do" after the scratch space was cleaned.
        cache = {}
    for key in ("fingerprint", "rows"):
        if cache and saved_cache.get(key) is not None and saved_cache[key] != cache.get(key):
            changed.append(f"cache {key}: {saved_cache[key]!r} -> {cache.get(key)!r}")
    if cache and not changed and saved_cache.get(CONTENT_HASH) is not None and \
            (now := content_hash(Path(config.cache))) != saved_cache[CONTENT_HASH]:
        changed.append(f"cache content: {saved_cache[CONTENT_HASH]!r} -> {now!r}{OTHER_ROWS}")
    # The model folder (or hub id) it trained from, recorded since 0.4.1 (before, --model as
    # given, which a relative path or a built-in name does not pin down: not compared).
    if trained_from := run_config.get("model_path"):
        try:
            # (adapters as the base of a merge: the merge says what to give instead)
            wanted = (resolve_model(config.model, adapters=_base_moved(run_config, config))
                      if config.model is not None
                      else cache.get("model_path") or cache.get("model"))
        except ModelError:
            if config.model is not None and Path(config.model).expanduser().exists():
                raise  # there, but no model: an error as in any run
            wanted = None  # gone too, like the cache: nothing to compare
        if wanted and os.path.abspath(trained_from) != os.path.abspath(wanted) and not \
                _base_moved(run_config, config):
            changed.append(f"model: {trained_from} -> {wanted}")
    return changed


def _base_moved(run_config: dict, config: TrainConfig) -> bool:
    """Whether --model names where the base of a finished LoRA run to merge is now (it moved, or
    its old folder holds another model since): the merge checks that it holds the weights the
    run trained on (models.lora_base)."""
    return bool(config.model is not None and config.merge_lora
                and (run_config.get("config") or {}).get("lora_r"))


TRAIN_LOCK = ".minorsft-train.lock"


@contextlib.contextmanager
def _output_lock(output: Path) -> Iterator[None]:
    """Hold --output for this run: a second train on the same folder (a job restarted while the
    first still runs) pruned the first's checkpoints from under it and both wrote the model.
    One process of a torchrun job holds it."""
    if not is_first_rank():
        yield
        return
    existed = output.exists()
    try:  # made now, not after minutes of model loading (a file in its path, say)
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if output.is_file():  # (check_output says so, as it says of every --output it refuses)
            yield
            return
        raise ValueError(f"--output {output}: cannot create the folder "
                         f"({error.strerror or error})") from error
    lock = output / TRAIN_LOCK
    had_lock = lock.exists()
    with folder_lock(output, TRAIN_LOCK, wait=False) as held:
        if not held:
            raise ValueError(f"--output {output}: another minorsft train is writing this folder "
                             f"(it holds {TRAIN_LOCK}); let it finish, or stop it and pass "
                             "--resume to continue from its last checkpoint")
        try:
            yield
        finally:  # nothing left behind: no lock file, no empty folder of a refused run
            if not had_lock:
                lock.unlink(missing_ok=True)
            if not existed and output.is_dir() and not any(output.iterdir()):
                output.rmdir()


def run_train(config: TrainConfig, console: Console | None = None) -> list[dict]:
    console = console or Console(stderr=True)
    with _output_lock(Path(config.output)):
        return _run_train(config, console)


def _run_train(config: TrainConfig, console: Console) -> list[dict]:
    if config.resume and (finished := _finished_run(config)) is not None:
        # A job script passes --resume on every (re)start: after the last one, nothing is left.
        # ("nothing to do" right after "merged ..." read as if the merge had not happened)
        merged = _merge_finished_lora_run(config, finished, console)
        console.print(f"{'nothing left to train' if merged else 'nothing to do'}: "
                      f"{config.output} holds a finished run (run_config.json); "
                      "--overwrite replaces it", markup=False)
        return []
    state = setup(config, console)
    if config.step0_check and state.start_step == 0:
        check_step0(state, config, console)
    clear_output(config, state.world.is_main, console)
    # One stop request over training and the final save: a Ctrl-C or SIGTERM that comes while
    # the model is written (minutes for a large one) waits for it, instead of killing the run
    # with its model half written and no checkpoint of the last steps.
    with StopRequest() as stop:
        history = fit(state, config, console, stop)
        save(state, config)
    if stop.requested and state.world.is_main:
        console.print("note: the stop request came while the model was being saved; the run "
                      "finished and is saved", markup=False)
    # All ranks leave together: a rank that tore down its process group while rank 0 was still
    # writing the model made gloo abort ("terminate called without an active exception").
    barrier(state.world)
    # Torn down on success only. After an error (or Ctrl-C) the other ranks may be anywhere:
    # a barrier could wait forever, and so could destroying the group, which joins gloo's
    # workers (docs/reliability.md). The command line then ends a torchrun worker right after
    # its message, without finalization (`cli._leave_torchrun_worker`).
    close_world(state.world)
    if state.world.is_main and not history:
        console.print(f"nothing to do: the checkpoint is at the last step "
                      f"({state.total_steps}); model saved in {config.output}", markup=False)
    if state.world.is_main and history:
        last = history[-1]
        # this process's training time: `elapsed` counts a resumed run's earlier ones too
        seconds = last["elapsed"] - history[0]["elapsed"] + history[0]["step_seconds"]
        # (the evaluations after this session's steps but before its last: the tok/s are
        # training's)
        evaluating = sum(spent for done, spent in state.heldout_seconds.items()
                         if history[0]["step"] < done <= last["step"])
        held = f" ({evaluating:.1f} s of them held-out evaluations)" if evaluating else ""
        console.print(
            f"done: {len(history)} step{'s' * (len(history) != 1)} in {seconds:.0f} s{held} on "
            f"{state.world.world_size} process(es), "
            f"{sum(h['tokens'] for h in history) / (seconds - evaluating):.0f} tok/s overall; "
            f"final loss {last['loss']:.4f}, m_theta {last['m_theta']:+.3e}; model and metrics "
            f"in {config.output}", markup=False)
    return history


# --- step-0 guard --------------------------------------------------------------------------------

STEP0_ROWS = 8
# Mean |log pi_theta - log pi_ref| per answer token that numerics alone explain at step 0, by the
# coarser of the cache's and the run's dtype. fp32 against fp32 measured 0 here; a bf16 policy
# against an fp32 SmolLM2 cache measured 0.015 (docs/reliability.md); the spec's bf16-vs-fp32
# scoring of 256 GSM8K answers moved summed log-probs by ~0.005 nats/token on average.
STEP0_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1, MIXED_PRECISION: 0.1,
                   FP16_MIXED_PRECISION: 0.1}


def policy_logps(state: TrainState, config: TrainConfig, rows: list[dict],
                 split: bool = False) -> list[float]:
    """The policy's summed answer log-probs of cache `rows`, as the cache was scored: in eval
    mode (no dropout), without gradients, in the training precision, a micro-batch at a time.

    Every rank gets them all. With `split` the ranks share the micro-batches (rank r scores the
    r-th, and every world-size-th after it) and add up what they scored (each row's score and
    zeros: exact); otherwise every rank scores every row. Each rank runs as many forwards either
    way (one with none left repeats its first and drops the result): FSDP needs every rank in
    each forward, and DDP's may sync buffers. No random numbers are drawn, so a run's training
    is the same with or without these looks at the policy.
    """
    ranks, rank = (state.world.world_size, state.world.rank) if split else (1, 0)
    starts = range(0, len(rows), config.micro_batch_size)
    scores = [0.0] * len(rows)
    was_training = state.model.training
    state.model.eval()
    try:
        with torch.no_grad(), compute_precision(state):
            for turn in range(math.ceil(len(starts) / ranks)):
                index = rank + turn * ranks
                start = starts[index] if index < len(starts) else starts[0]
                micro = rows[start: start + config.micro_batch_size]
                logps, _ = state.policy(micro, state.tokenizer.pad_token_id, state.device,
                                        state.packing)
                if index < len(starts):
                    scores[start: start + len(micro)] = logps.tolist()
    finally:
        state.model.train(was_training)
    if ranks > 1:
        total = torch.tensor(scores, dtype=torch.float64, device=state.device)
        scores = all_reduce_sum(total, state.world).tolist()
    return scores


def check_step0(state: TrainState, config: TrainConfig, console: Console) -> dict:
    """Before the first step: the policy's own log-probs on a few cache rows must match the cache.

    At step 0 the policy is the reference, so r / m (the per-token log-ratio, whose batch mean
    is m_theta) must be near 0 on every row. The test is on the mean of |r| / m over the rows
    (signs cannot cancel, one odd short answer cannot trip it alone); the message also gives
    m_theta and the worst row. A cache scored from other weights, in another dtype than claimed,
    or by a broken engine shows up here, and training on it would weight every sample wrongly.
    With `allow_mismatch` (a different starting model on purpose) it warns instead of stopping.
    """
    rows = list(islice(iter_rows(Path(config.cache)), STEP0_ROWS))
    policy = policy_logps(state, config, rows)
    per_token = [(p - r["ref_logps"]) / r["num_tokens"]
                 for p, r in zip(policy, rows, strict=True)]
    m_theta = sum(per_token) / len(per_token)
    mean_abs = sum(abs(x) for x in per_token) / len(per_token)
    worst = max(range(len(rows)), key=lambda i: abs(per_token[i]))
    dtypes = (str(state.metadata.get("dtype")), training_precision(state))
    tolerance = config.step0_tolerance
    if tolerance is None:
        # bitsandbytes' 4-bit layers compute at about bf16's precision whatever --dtype says
        # (on a CPU: 0.4 % of a SmolLM2 layer's output), so the cache's padded batches and
        # training's packed rows differ by bf16-sized amounts (SmolLM2: 0.004 nats per token)
        quantized = ("bfloat16",) if config.load_in_4bit else ()
        tolerance = max(STEP0_TOLERANCE.get(d, 0.1) for d in (*dtypes, *quantized))
    result = {"rows": len(rows), "m_theta": m_theta, "mean_abs_per_token": mean_abs,
              "max_abs_per_token": abs(per_token[worst]), "tolerance": tolerance}
    figures = (f"step-0 m_theta {m_theta:+.3g}, mean |r|/m {mean_abs:.3g} nats per answer token, "
               f"worst row {abs(per_token[worst]):.3g}")
    if not all(map(math.isfinite, policy)):
        raise FloatingPointError(
            f"step-0 check: the policy's log-probs of the first {len(rows)} cache rows are not "
            f"all finite ({figures}): the starting model gives NaN or infinite log-probs before "
            f"any update (broken weights, or a dtype that overflows: dtype {dtypes[1]})")
    if mean_abs > tolerance:
        row = rows[worst]
        error = CacheError(
            f"step-0 check failed: on the first {len(rows)} cache rows the policy's own "
            f"log-probs differ from the cached reference ones: {figures} (id {row['id']!r}, "
            f"{input_place(row)}: policy {policy[worst]:.4f}, cache "
            f"{row['ref_logps']:.4f} over {row['num_tokens']} tokens). That is more than "
            f"--step0-tolerance {tolerance:g}, what the dtypes (cache {dtypes[0]}, training "
            f"{dtypes[1]}) explain.\n"
            "At step 0 the policy should be the reference. The cache was probably scored from "
            "other weights, in another dtype, or by a faulty engine: re-run `minorsft precompute` "
            "with the policy's starting model and the training dtype. If you start from another "
            "model on purpose (with --allow-mismatch) or know the cause, raise "
            "--step0-tolerance or pass --no-step0-check.")
        if not config.allow_mismatch:
            raise error
        # The user has accepted a different model: the numbers are expected to differ. Say so.
        if state.world.is_main:
            console.print(f"[yellow]warning (--allow-mismatch):[/] {escape(str(error))}",
                          highlight=False)
        return result
    if state.world.is_main:
        console.print(f"step-0 check on {len(rows)} rows: {figures} (tolerance {tolerance:g})")
    return result
