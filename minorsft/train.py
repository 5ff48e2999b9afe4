"""Stage 2: stream the cache, train the policy alone: setup -> fit -> save.

The trainer reads only the cache (token ids, answer masks, reference log-probs); it knows no input
format. Each optimizer step takes `batch_size` samples as micro-batches of `micro_batch_size` and
divides every micro-batch's summed loss by the step's sample count, so any split of the same
samples gives the same update (gradient accumulation is exact, not approximate).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from minorsft import __version__
from minorsft.cache import check_compatible, iter_rows, read_metadata
from minorsft.loss import LOSS_NAMES, compute_loss
from minorsft.models import (
    dtype_name,
    fingerprint,
    load_model,
    load_tokenizer,
    pick_attention,
    pick_device,
    pick_dtype,
    resolve_model,
)
from minorsft.packing import check_packing_support, micro_batch_logps

# The best learning rate per loss in the paper's sweep (section 4, Figure 2).
PAPER_LR = {"minorsft": 2e-5, "sft-dpo": 2e-5, "sft": 1e-5}


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
    shuffle: bool = True
    shuffle_buffer: int = 4096
    allow_mismatch: bool = False
    log_every: int = 1
    packing: bool = False  # padding-free: each micro-batch in one row (see minorsft.packing)
    lora_r: int = 0  # 0: full fine-tuning; >0: LoRA adapters of this rank (needs peft)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    merge_lora: bool = False  # also save the merged model in <output>/merged

    def __post_init__(self):
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSS_NAMES)}")
        if self.lr is None:
            self.lr = PAPER_LR[self.loss]
        if self.lr <= 0:
            raise ValueError("--lr must be positive")
        if self.loss != "sft" and self.beta <= 0:
            raise ValueError("--beta must be positive")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("--batch-size and --micro-batch-size must be positive")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of "
                             f"--micro-batch-size {self.micro_batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("--warmup-ratio must lie in [0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("--max-steps must be positive")
        if self.lora_r < 0 or (self.merge_lora and not self.lora_r):
            raise ValueError("--lora-r must be >= 0, and --merge-lora needs --lora-r > 0")

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size


def sample_stream(cache: Path, seed: int, shuffle: bool, buffer_size: int,
                  epochs: int | None) -> Iterator[dict]:
    """Cache rows, epoch after epoch (forever if `epochs` is None), shuffled through a buffer.

    A seeded shuffle buffer keeps memory bounded while still mixing neighbouring rows; the order
    is a pure function of (cache, seed), so a run can be reproduced.
    """
    epoch = 0
    while epochs is None or epoch < epochs:
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
        epoch += 1


def global_batches(stream: Iterator[dict], batch_size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for row in stream:
        batch.append(row)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the peak lr, then linear decay to zero (the paper's schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainState:
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    total_steps: int
    metadata: dict
    model_path: str


def setup(config: TrainConfig, console: Console) -> TrainState:
    cache = Path(config.cache)
    metadata = read_metadata(cache)
    model_name = config.model or metadata["model"]
    model_path = resolve_model(model_name)
    tokenizer = load_tokenizer(model_path)
    if not config.allow_mismatch:
        run_fingerprint = fingerprint(model_path, tokenizer).as_dict()
        check_compatible(metadata, {f"fingerprint.{k}": v for k, v in run_fingerprint.items()},
                         cache)
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    model = load_model(model_path, dtype, device, pick_attention(config.attention, device))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if config.packing:
        check_packing_support(model)
    if config.lora_r:
        from minorsft.lora import apply_lora

        model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout,
                           config.lora_target_modules)
    model.train()
    rows = int(metadata["rows"])
    steps_per_epoch = math.ceil(rows / config.batch_size)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999), eps=1e-8,
    )
    warmup_steps = int(config.warmup_ratio * total_steps)
    scheduler = linear_schedule(optimizer, warmup_steps, total_steps)
    console.print(
        f"[bold]minorsft train[/] loss={config.loss} beta={config.beta} lr={config.lr} "
        f"model={model_name} cache={cache} ({rows} rows, engine {metadata.get('engine')}, "
        f"{metadata.get('dtype')}) device={device} dtype={dtype_name(dtype)}\n"
        f"global batch {config.batch_size} = micro-batch {config.micro_batch_size} x "
        f"accumulation {config.accumulation_steps}; {total_steps} steps, {warmup_steps} warm-up"
    )
    return TrainState(model, tokenizer, optimizer, scheduler, device, dtype, total_steps,
                      metadata, model_path)


def train_step(state: TrainState, config: TrainConfig, rows: list[dict]) -> dict:
    """One optimizer step over `rows` (the step's samples). Returns the step's metrics."""
    model, device = state.model, state.device
    pad_id = state.tokenizer.pad_token_id
    count = len(rows)
    sums = {"loss": 0.0, "nll": 0.0, "m_theta": 0.0, "coefficient": 0.0, "reward": 0.0,
            "policy_logps": 0.0, "ref_logps": 0.0}
    tokens = 0
    for start in range(0, count, config.micro_batch_size):
        micro = rows[start: start + config.micro_batch_size]
        policy_logps, micro_tokens = micro_batch_logps(model, micro, pad_id, device,
                                                       config.packing)
        ref_logps = torch.tensor([r["ref_logps"] for r in micro], device=device)
        num_tokens = torch.tensor([r["num_tokens"] for r in micro], device=device)
        out = compute_loss(config.loss, policy_logps, ref_logps, num_tokens, config.beta)
        # Divide by the step's sample count, not the micro-batch's: exact accumulation.
        (out.losses.sum() / count).backward()
        sums["loss"] += out.losses.detach().sum().item()
        sums["m_theta"] += out.deviation.sum().item()
        sums["coefficient"] += out.coefficient.sum().item()
        sums["reward"] += out.reward.sum().item()
        sums["policy_logps"] += policy_logps.detach().sum().item()
        sums["ref_logps"] += ref_logps.sum().item()
        # Per-token NLL of the answers (raw SFT's loss), comparable across all three losses.
        sums["nll"] += (-policy_logps.detach() / num_tokens).sum().item()
        tokens += micro_tokens
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    lr = state.scheduler.get_last_lr()[0]
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    metrics = {key: value / count for key, value in sums.items()}
    metrics.update(lr=lr, grad_norm=float(grad_norm), samples=count, tokens=tokens)
    return metrics


def fit(state: TrainState, config: TrainConfig, console: Console) -> list[dict]:
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    epochs = None if config.max_steps else config.epochs
    batches = global_batches(
        sample_stream(Path(config.cache), config.seed, config.shuffle, config.shuffle_buffer,
                      epochs), config.batch_size)
    history = []
    started = time.perf_counter()
    columns = (TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  m_theta {task.fields[m_theta]:+.2e}  "
                          "coef {task.fields[coef]:.3f}  {task.fields[tok_s]:.0f} tok/s"),
               TimeElapsedColumn())
    with (output / "metrics.jsonl").open("w", encoding="utf-8") as log, \
            Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=state.total_steps, loss=float("nan"),
                                 m_theta=0.0, coef=0.5, tok_s=0.0)
        for step, rows in zip(range(state.total_steps), batches, strict=False):
            step_started = time.perf_counter()
            metrics = train_step(state, config, rows)
            seconds = time.perf_counter() - step_started
            metrics = {"step": step, **metrics, "tokens_per_s": metrics["tokens"] / seconds,
                       "step_seconds": seconds, "elapsed": time.perf_counter() - started}
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss became {metrics['loss']} at step {step}")
            history.append(metrics)
            if step % config.log_every == 0 or step == state.total_steps - 1:
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            progress.update(task, advance=1, loss=metrics["loss"], m_theta=metrics["m_theta"],
                            coef=metrics["coefficient"], tok_s=metrics["tokens_per_s"])
    return history


def save(state: TrainState, config: TrainConfig) -> Path:
    """A folder that transformers and vLLM load as is, plus the run's config."""
    output = Path(config.output)
    state.model.config.use_cache = True
    if config.lora_r:
        from minorsft.lora import save_lora

        save_lora(state.model, output, config.merge_lora)
    else:
        state.model.save_pretrained(output, safe_serialization=True)
    state.tokenizer.save_pretrained(output)
    run_config = {"config": asdict(config), "minorsft_version": __version__,
                  "cache_metadata": state.metadata, "total_steps": state.total_steps,
                  "dtype": dtype_name(state.dtype), "device": str(state.device)}
    (output / "run_config.json").write_text(json.dumps(run_config, indent=2))
    return output


def run_train(config: TrainConfig, console: Console | None = None) -> list[dict]:
    console = console or Console(stderr=True)
    state = setup(config, console)
    history = fit(state, config, console)
    save(state, config)
    last = history[-1]
    console.print(f"done: {len(history)} steps, final loss {last['loss']:.4f}, "
                  f"m_theta {last['m_theta']:+.3e}; model and metrics in {config.output}")
    return history
