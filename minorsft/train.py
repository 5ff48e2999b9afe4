"""Stage 2: stream the cache, train the policy alone: setup -> fit -> save.

The trainer reads only the cache (token ids, answer masks, reference log-probs); it knows no input
format. Each optimizer step takes `batch_size` samples as micro-batches of `micro_batch_size` and
divides every micro-batch's summed loss by the step's sample count, so any split of the same
samples gives the same update (gradient accumulation is exact, not approximate).
"""

from __future__ import annotations

import json
import math
import os
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
from minorsft.distributed import (
    STRATEGIES,
    World,
    all_reduce_sum,
    close_world,
    full_state_dict,
    init_world,
    no_gradient_sync,
    rank_device,
    rank_slice,
    wrap_policy,
)
from minorsft.logprobs import pad_batch
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
    strategy: str = "ddp"  # under torchrun: ddp or fsdp (FSDP2)
    cpu_offload: bool = False  # FSDP2 only: keep parameters and optimizer state on the CPU

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
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose ddp or fsdp")

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per rank per step: global batch / (micro-batch x world size)."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of "
                             f"--micro-batch-size {self.micro_batch_size} x {world_size} "
                             "processes")
        return self.batch_size // per_step


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


def setup(config: TrainConfig, console: Console) -> TrainState:
    world = init_world(config.device)
    accumulation = config.accumulation_steps(world.world_size)
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
    device = pick_device(rank_device(world, config.device))
    dtype = pick_dtype(config.dtype, device)
    # FSDP2 keeps fp32 master weights and computes in `dtype` through its mixed-precision policy.
    fsdp = world.distributed and config.strategy == "fsdp"
    load_dtype = torch.float32 if fsdp else dtype
    model = load_model(model_path, load_dtype, device, pick_attention(config.attention, device))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    policy = wrap_policy(model, world, config.strategy, device, dtype if fsdp else None,
                         config.cpu_offload)
    rows = int(metadata["rows"])
    steps_per_epoch = math.ceil(rows / config.batch_size)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad],
        lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999), eps=1e-8,
    )
    warmup_steps = int(config.warmup_ratio * total_steps)
    scheduler = linear_schedule(optimizer, warmup_steps, total_steps)
    console.print(
        f"[bold]minorsft train[/] loss={config.loss} beta={config.beta} lr={config.lr} "
        f"model={model_name} cache={cache} ({rows} rows, engine {metadata.get('engine')}, "
        f"{metadata.get('dtype')}) device={device} dtype={dtype_name(dtype)}\n"
        f"global batch {config.batch_size} = micro-batch {config.micro_batch_size} x "
        f"accumulation {accumulation} x {world.world_size} process(es)"
        + (f" ({config.strategy})" if world.distributed else "")
        + f"; {total_steps} steps, {warmup_steps} warm-up"
    )
    return TrainState(model, policy, world, tokenizer, optimizer, scheduler, device, dtype,
                      total_steps, metadata, model_path)


METRIC_SUMS = ("loss", "nll", "m_theta", "coefficient", "reward", "policy_logps", "ref_logps")


def train_step(state: TrainState, config: TrainConfig, rows: list[dict]) -> dict:
    """One optimizer step over `rows`, the step's global batch. Returns the step's metrics.

    Every micro-batch's loss is its summed per-sample loss divided by the step's global sample
    count (times the world size, which DDP/FSDP divide back out when they average gradients), so
    the update is the gradient of the mean over the step however it is split.
    """
    world, device = state.world, state.device
    pad_id = state.tokenizer.pad_token_id
    count = len(rows)
    local = rank_slice(rows, world)
    weight = 1.0
    if not local:  # a short last batch can leave a rank without rows; it must still take part
        local, weight = rows[:1], 0.0
    micro_batches = [local[i: i + config.micro_batch_size]
                     for i in range(0, len(local), config.micro_batch_size)]
    sums = dict.fromkeys(METRIC_SUMS, 0.0)
    tokens = 0
    for index, micro in enumerate(micro_batches):
        input_ids, attention_mask, answer_mask = pad_batch(
            [r["input_ids"] for r in micro], [r["answer_mask"] for r in micro], pad_id, device)
        ref_logps = torch.tensor([r["ref_logps"] for r in micro], device=device)
        num_tokens = torch.tensor([r["num_tokens"] for r in micro], device=device)
        with no_gradient_sync(state.policy, sync=index == len(micro_batches) - 1):
            policy_logps = state.policy(input_ids, attention_mask, answer_mask)
            out = compute_loss(config.loss, policy_logps, ref_logps, num_tokens, config.beta)
            (out.losses.sum() * (weight * world.world_size / count)).backward()
        policy_detached = policy_logps.detach()
        sums["loss"] += weight * out.losses.detach().sum().item()
        # Per-token NLL of the answers (raw SFT's loss), comparable across all three losses.
        sums["nll"] += weight * (-policy_detached / num_tokens).sum().item()
        sums["m_theta"] += weight * out.deviation.sum().item()
        sums["coefficient"] += weight * out.coefficient.sum().item()
        sums["reward"] += weight * out.reward.sum().item()
        sums["policy_logps"] += weight * policy_detached.sum().item()
        sums["ref_logps"] += weight * ref_logps.sum().item()
        tokens += int(weight * attention_mask.sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(state.policy.parameters(), config.max_grad_norm)
    lr = state.scheduler.get_last_lr()[0]
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    totals = all_reduce_sum([sums[key] for key in METRIC_SUMS] + [tokens], world, device)
    metrics = {key: value / count for key, value in zip(METRIC_SUMS, totals, strict=False)}
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
        grad_norm = grad_norm.full_tensor()
    metrics.update(lr=lr, grad_norm=float(grad_norm), samples=count, tokens=int(totals[-1]),
                   rank_tokens=tokens)
    return metrics


def fit(state: TrainState, config: TrainConfig, console: Console) -> list[dict]:
    output = Path(config.output)
    main = state.world.is_main
    if main:
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
    metrics_path = output / "metrics.jsonl" if main else Path(os.devnull)
    with metrics_path.open("w", encoding="utf-8") as log, \
            Progress(*columns, console=console, disable=not main) as progress:
        task = progress.add_task("train", total=state.total_steps, loss=float("nan"),
                                 m_theta=0.0, coef=0.5, tok_s=0.0)
        for step, rows in zip(range(state.total_steps), batches, strict=False):
            step_started = time.perf_counter()
            metrics = train_step(state, config, rows)
            seconds = time.perf_counter() - step_started
            metrics = {"step": step, **metrics, "tokens_per_s": metrics["tokens"] / seconds,
                       "rank_tokens_per_s": metrics["rank_tokens"] / seconds,
                       "world_size": state.world.world_size,
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
    weights = full_state_dict(state.policy, state.world, config.strategy)  # collective
    if not state.world.is_main:
        return output
    state.model.config.use_cache = True
    state.model.save_pretrained(output, state_dict=weights, safe_serialization=True)
    state.tokenizer.save_pretrained(output)
    run_config = {"config": asdict(config), "minorsft_version": __version__,
                  "cache_metadata": state.metadata, "total_steps": state.total_steps,
                  "dtype": dtype_name(state.dtype), "device": str(state.device),
                  "world_size": state.world.world_size}
    (output / "run_config.json").write_text(json.dumps(run_config, indent=2))
    return output


def run_train(config: TrainConfig, console: Console | None = None) -> list[dict]:
    console = console or Console(stderr=True)
    state = setup(config, console)
    try:
        history = fit(state, config, console)
        save(state, config)
    finally:
        close_world(state.world)
    if state.world.is_main and history:
        last = history[-1]
        seconds = last["elapsed"]
        console.print(
            f"done: {len(history)} steps in {seconds:.0f} s on {state.world.world_size} "
            f"process(es), {sum(h['tokens'] for h in history) / seconds:.0f} tok/s overall; "
            f"final loss {last['loss']:.4f}, m_theta {last['m_theta']:+.3e}; model and metrics "
            f"in {config.output}")
    return history
