"""Checkpoints of a training run: write them atomically, resume from the latest, stop cleanly.

A checkpoint holds the trainable weights, the optimizer, the scheduler, the RNG states and the
settings that must not change on resumption, so that a resumed run's metrics from then on equal
those of an uninterrupted one. Ctrl-C or SIGTERM asks for a checkpoint after the current step.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console

from minorsft import __version__
from minorsft.cache import CONTENT_HASH, honour_umask, readable_weights
from minorsft.distributed import all_reduce_sum, barrier
from minorsft.models import base_fingerprint, dtype_name, precision_name
from minorsft.optim import LOW_PRECISION, MasterWeightsAdamW, optimizer_order

if TYPE_CHECKING:
    from minorsft.train import TrainConfig, TrainState

CHECKPOINTS = "checkpoints"
# Settings that must not change between a run and its resumption (else the metrics would not
# continue those of an uninterrupted run). micro_batch_size may change: accumulation is exact.
RESUME_KEYS = ("cache_rows", "cache_fingerprint", "cache_content", "model", "loss", "beta",
               "lr", "batch_size", "epochs", "max_steps", "warmup_ratio", "weight_decay",
               "max_grad_norm", "seed", "shuffle", "shuffle_buffer", "total_steps", "dtype",
               "master_weights", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
               "batching", "keep_dropout", "load_in_4bit")
# What a checkpoint written before a setting existed ran with (None: not known, not compared).
RESUME_DEFAULTS = {"cache_content": None, "master_weights": False, "lora_r": None,
                   "lora_alpha": None, "lora_dropout": None, "lora_target_modules": None,
                   "batching": "one stream over all epochs", "keep_dropout": None,
                   "load_in_4bit": False}
# What a changed cache_content means (cache.content_hash).
OTHER_ROWS = (" (the cache's rows or reference log-probs are not the run's: another --data, "
              "--max-length or model, or the rows scored again; give the run's own cache)")
# How steps take their samples: the batches of each epoch apart (since 0.3.0); before, one
# stream over all epochs, whose batches could span two epochs.
BATCHING = "per epoch"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training: a checkpoint was saved, `--resume` continues."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted after step {step}; checkpoint saved in {path}; run the "
                         "same command with --resume to continue")
        self.step, self.path = step, path


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be read (cut short by a full disk, overwritten): named,
    with the way on, instead of the reader's traceback (torch's even advised weights_only=False,
    which would run whatever the file holds)."""

    def __init__(self, path: Path, error: Exception):
        # (the first sentence: torch's goes on to advise weights_only=False, which would run
        # whatever code a file that is no checkpoint of ours holds)
        reason = " ".join(str(error).split()).split(". ")[0][:200] or "unreadable"
        super().__init__(f"{path}: cannot read it ({type(error).__name__}: {reason}); the "
                         f"checkpoint {path.parent} is damaged")


def _read(path: Path, read):
    """`read(path)`, a checkpoint file's reader, with a failure of the file as
    :class:`DamagedCheckpoint`. (Only the reading: a setting that differs is refused by the
    caller as such.) Memory that ran out and a file this user may not read are no damage: the
    advice to delete the checkpoint would lose a good one, so they pass as they are."""
    try:
        return read(path)
    except (MemoryError, torch.OutOfMemoryError, PermissionError):
        raise
    except Exception as error:
        if "out of memory" in str(error).lower():  # (a reader's own wording of it)
            raise
        raise DamagedCheckpoint(path, error) from error


def _torch_file(path: Path):
    return torch.load(path, weights_only=True)


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request to checkpoint and stop after the
    current step; a second Ctrl-C stops at once, without saving (a second SIGTERM does not).

    Only the same signal again counts as the second: a Ctrl-C reaches torchrun's workers both
    from the terminal (SIGINT) and from torchrun, which passes it on as SIGTERM, and that pair
    is one request, which must still save."""

    def __init__(self, enabled: bool = True):
        self.seen: set[int] = set()  # the signals that asked so far
        self.enabled = enabled
        self._previous = {}

    @property
    def requested(self) -> bool:
        return bool(self.seen)

    def _handle(self, signum, frame):
        # A repeated SIGTERM is no "stop now": a scheduler (scancel, pre-emption) signals every
        # process of the job, and torchrun passes its own SIGTERM on to its workers, so each
        # worker gets two for one request. torchrun escalates to SIGKILL by itself.
        if signum in self.seen and signum != signal.SIGTERM:
            raise KeyboardInterrupt
        self.seen.add(signum)

    def agreed(self, state: TrainState) -> bool:
        """Whether any rank was asked to stop (torchrun signals ranks at slightly different
        moments; all must stop after the same step or their collectives would hang)."""
        if not state.world.distributed:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=state.device)
        return all_reduce_sum(flag, state.world).item() > 0

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def is_fsdp_run(state: TrainState, config: TrainConfig) -> bool:
    """Whether the policy's parameters are FSDP2 shards (torchrun, --strategy fsdp)."""
    return state.world.distributed and config.strategy == "fsdp"


def _resume_settings(state: TrainState, config: TrainConfig) -> dict:
    values = asdict(config)
    values.update(cache_rows=state.metadata.get("rows"),
                  cache_fingerprint=state.metadata.get("fingerprint"),
                  # (rows and log-probs: another cache of as many rows and the same model)
                  cache_content=state.metadata.get(CONTENT_HASH),
                  # the model as loaded: --model naming the cache's model is the same run
                  model=state.model_path,
                  total_steps=state.total_steps, dtype=precision_name(state.dtype, state.autocast),
                  master_weights=isinstance(state.optimizer, MasterWeightsAdamW),
                  batching=BATCHING)
    return {key: values[key] for key in RESUME_KEYS}


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `output`, oldest first (a directory exists only when whole)."""
    folder = Path(output) / CHECKPOINTS
    found = []
    for path in folder.glob("step-*") if folder.is_dir() else []:
        step = path.name.removeprefix("step-")
        if step.isdigit() and (path / "trainer_state.json").exists():
            found.append((int(step), path))
    return sorted(found)


def save_checkpoint(state: TrainState, config: TrainConfig, step: int) -> Path:
    """Write model, optimizer, scheduler and RNG states after `step` steps, atomically.

    Everything goes into a hidden staging folder that is renamed to ``step-N`` once complete;
    only then are checkpoints beyond the newest `keep_checkpoints` deleted. A failure (full
    disk, a kill) leaves the earlier checkpoints as they were. Under FSDP2 every rank takes part
    in gathering the full weights (fp32) and optimizer state (keyed by parameter name), which
    rank 0 writes. Either kind resumes anywhere: under FSDP with any number of processes, under
    DDP or in one process (`load_checkpoint` converts).
    """
    from safetensors.torch import save_file

    folder = Path(config.output) / CHECKPOINTS
    target = folder / f"step-{step}"
    trainable = [name for name, p in state.model.named_parameters() if p.requires_grad]
    if is_fsdp_run(state, config):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it
        full = get_model_state_dict(state.model, options=options)
        optimizer_state = get_optimizer_state_dict(state.model, state.optimizer, options=options)
        weights = {name: full[name].contiguous() for name in trainable} if full else {}
        optimizer_format = "by-name"
    else:
        weights = {name: p.detach().contiguous() for name, p in
                   state.model.named_parameters() if p.requires_grad}
        optimizer_state, optimizer_format = state.optimizer.state_dict(), "torch"
    # Every rank's RNG states: ranks draw different amounts (dropout on rows of other lengths),
    # and each must continue its own stream for a resumed run to equal an uninterrupted one.
    rng = _rng_states(state.world)
    if state.world.distributed:  # rank 0 writes; the others wait until it is complete
        if state.world.is_main:
            _write_checkpoint(state, config, step, folder, target, save_file, weights,
                              optimizer_state, optimizer_format, rng)
        barrier(state.world)
        return target
    _write_checkpoint(state, config, step, folder, target, save_file, weights, optimizer_state,
                      optimizer_format, rng)
    return target


def _rng_states(world) -> dict:
    """{"ranks": [each rank's torch, python and CUDA RNG states]} (a collective under torchrun)."""
    mine = {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if not world.distributed:
        return {"ranks": [mine]}
    import torch.distributed as dist

    gathered = [None] * world.world_size
    dist.all_gather_object(gathered, mine)
    return {"ranks": gathered}


def _restore_rng(path: Path, world) -> None:
    """This rank's RNG states from a checkpoint. Where the world size changed (and in
    checkpoints of minorsft <= 0.2.x, which kept only rank 0's), rank 0's states, from which
    every rank then draws a seed of its own: ranks must not draw the same dropout masks."""
    saved = _read(path / "rng.pt", _torch_file)
    ranks = saved.get("ranks", [saved])
    same_world = len(ranks) == world.world_size
    rng = ranks[world.rank] if same_world else ranks[0]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] and torch.cuda.is_available():
        # one state per GPU the saving process saw: a machine with fewer GPUs takes those it has
        for index, cuda_state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    if not same_world and world.world_size > 1:
        base = int(torch.randint(2**62, (1,)).item())  # the same on every rank
        torch.manual_seed(base + world.rank)  # (CUDA's generators too)
        random.seed(base + world.rank)


def _write_checkpoint(state: TrainState, config: TrainConfig, step: int, folder: Path,
                      target: Path, save_file, weights: dict, optimizer_state: dict,
                      optimizer_format: str, rng: dict) -> None:
    if (target / "trainer_state.json").exists():
        return
    if target.exists():  # (one without its trainer state, a hand-damaged one: written anew)
        shutil.rmtree(target)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step-*"):  # a save killed midway (SIGKILL skips the cleanup)
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".step-{step}.", dir=folder))
    honour_umask(staging)
    try:
        save_file(weights, staging / "model.safetensors")
        readable_weights(staging)
        torch.save(optimizer_state, staging / "optimizer.pt")
        torch.save(state.scheduler.state_dict(), staging / "scheduler.pt")
        if state.scaler is not None:  # fp16-mixed: the loss scale found so far
            torch.save(state.scaler.state_dict(), staging / "scaler.pt")
        torch.save(rng, staging / "rng.pt")
        trainer_state = {"step": step, "settings": _resume_settings(state, config),
                         "split": _split(state, config),
                         "optimizer_format": optimizer_format, "minorsft_version": __version__,
                         # what the loaded model is, wherever it is: a resume finds it moved
                         "model_fingerprint": base_fingerprint(state.model_path)}
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for _, old in list_checkpoints(config.output)[:-config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def _same_model(saved: str | None, state: TrainState, config: TrainConfig) -> bool:
    """Whether a checkpoint's model is the one this run loaded. Checkpoints name the loaded
    model's folder; those of minorsft <= 0.2.0 named --model as given (None: the cache's)."""
    if saved is None:
        return config.model is None or _same_folder(state.metadata.get("model_path"),
                                                    state.model_path)
    return saved == config.model or _same_folder(saved, state.model_path)


def _moved_model(saved: str | None, state: TrainState, trainer_state: dict) -> bool:
    """Whether this run's model is the checkpoint's moved elsewhere: its folder is gone, and
    the model loaded now has the weights and config.json the checkpoint recorded (since
    0.9.3). A LoRA run's base above all, which the adapters are nothing without."""
    recorded = trainer_state.get("model_fingerprint")
    return bool(recorded and saved and Path(saved).is_absolute() and not Path(saved).exists()
                and base_fingerprint(state.model_path) == recorded)


def _same_folder(recorded: str | None, model_path: str) -> bool:
    """Whether a recorded model (a folder, relative to where it ran before 0.3.1) is
    `model_path`, as `models.resolve_model` gives it."""
    if recorded is None:
        return False
    return recorded == model_path or os.path.abspath(recorded) == os.path.abspath(model_path)


def load_checkpoint(state: TrainState, config: TrainConfig, path: Path) -> int:
    """Restore a checkpoint into `state`; returns the number of steps it had done."""
    from safetensors.torch import load_file

    trainer_state = _read(path / "trainer_state.json", lambda f: json.loads(f.read_text()))
    saved, now = trainer_state["settings"], _resume_settings(state, config)
    saved = {key: saved.get(key, RESUME_DEFAULTS.get(key)) for key in RESUME_KEYS}
    if _same_model(saved["model"], state, config) or _moved_model(saved["model"], state,
                                                                   trainer_state):
        saved["model"] = now["model"]
    # FSDP updates fp32 weights whatever --master-weights says (its mixed-precision policy):
    # a bf16 run under FSDP continues as a bf16 run on master weights elsewhere, and back.
    by_name = trainer_state.get("optimizer_format") == "by-name"  # written under FSDP
    if by_name:
        saved["master_weights"] = saved["dtype"] in LOW_PRECISION_NAMES
    fsdp = is_fsdp_run(state, config)
    if fsdp:
        now["master_weights"] = now["dtype"] in LOW_PRECISION_NAMES
    changed = [f"{key}: checkpoint {saved[key]!r}, this run {now[key]!r}"
               + (OTHER_ROWS if key == "cache_content" else "")
               for key in RESUME_KEYS if saved[key] is not None and saved[key] != now[key]]
    if ("keep_dropout" not in trainer_state["settings"] and state.model_dropout
            and not config.keep_dropout):
        # minorsft < 0.4.1 trained with the model's dropout: continuing without it would
        # change the run half way
        changed.append("keep_dropout: the checkpoint (minorsft < 0.4.1) trained with the "
                       f"model's dropout ({', '.join(state.model_dropout)}), this run "
                       "without: pass --keep-dropout to continue it")
    if fsdp and saved["master_weights"] is False and now["master_weights"]:
        changed.append("(FSDP always updates fp32 weights: a pure bf16/fp16 run, "
                       "--no-master-weights, resumes in one process or under DDP only)")
    if changed:
        raise ValueError(f"cannot resume from {path}: settings differ:\n  "
                         + "\n  ".join(changed) + "\nResume with the original settings, or "
                         "start a new run in another --output.")
    device = "cpu" if fsdp else str(state.device)
    weights = _read(path / "model.safetensors", lambda f: load_file(f, device=device))
    # in the optimizer's numbering: its index-keyed state and master weights follow it
    trainable = optimizer_order([(name, p) for name, p in state.model.named_parameters()
                                 if p.requires_grad], config.weight_decay)
    names = [name for name, _ in trainable]
    if set(weights) != set(names):
        raise ValueError(f"{path}: its weights do not match the model's trainable parameters")
    optimizer_state = _read(path / "optimizer.pt",
                            lambda f: torch.load(f, map_location=device, weights_only=True))
    if len(optimizer_state["param_groups"]) != len(state.optimizer.param_groups):
        raise ValueError(f"cannot resume from {path}: its optimizer has "
                         f"{len(optimizer_state['param_groups'])} parameter group(s), this run's "
                         f"{len(state.optimizer.param_groups)}. Before 0.4.1, --weight-decay "
                         "decayed biases and norm gains too (one group); resume it with the "
                         "minorsft version that wrote it, or start a new run")
    # FSDP's weights are its fp32 ones; elsewhere the master weights are the exact values
    exact = weights if by_name else _exact_weights(path, weights, names, optimizer_state)
    if fsdp:
        # Full, name-keyed states: each rank takes its shards of the fp32 values.
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not by_name:
            optimizer_state = _index_keyed_to_names(optimizer_state, names)
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(state.model, exact, options=options)
        set_optimizer_state_dict(state.model, state.optimizer, optimizer_state, options=options)
    else:
        if by_name:
            optimizer_state = _names_to_index_keyed(optimizer_state, names)
            if isinstance(state.optimizer, MasterWeightsAdamW):
                # its copies: one per bf16/fp16 parameter, in parameter order
                optimizer_state["master_weights"] = [
                    exact[name].float() for name, p in trainable if p.dtype in LOW_PRECISION]
        state.model.load_state_dict(exact, strict=False)  # cast to the parameters' dtype
        state.optimizer.load_state_dict(optimizer_state)
    state.scheduler.load_state_dict(_read(path / "scheduler.pt", _torch_file))
    if state.scaler is not None and (path / "scaler.pt").exists():
        state.scaler.load_state_dict(_read(path / "scaler.pt", _torch_file))
    _restore_rng(path, state.world)
    return int(trainer_state["step"])


LOW_PRECISION_NAMES = tuple(dtype_name(dtype) for dtype in LOW_PRECISION)


def _exact_weights(path: Path, weights: dict, names: list[str], optimizer_state: dict) -> dict:
    """An index-keyed checkpoint's weights at full precision: where the run kept fp32 master
    weights (`MasterWeightsAdamW`, one per bf16/fp16 parameter, in parameter order), those
    instead of the rounded ones in model.safetensors."""
    masters = optimizer_state.get("master_weights")
    if masters is None:
        return weights
    low = [name for name in names if weights[name].dtype in LOW_PRECISION]
    if len(low) != len(masters):
        raise ValueError(f"{path}: {len(masters)} master weights for {len(low)} bf16/fp16 "
                         "parameters; the checkpoint does not belong to this model")
    return {**weights, **dict(zip(low, masters, strict=True))}


def _index_keyed_to_names(optimizer_state: dict, names: list[str]) -> dict:
    """torch's optimizer state (parameters numbered in the order the optimizer got them: the
    trainable parameters') keyed by parameter name instead, as FSDP's full state dict is."""
    return {"state": {names[index]: value for index, value in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in optimizer_state["param_groups"]]}


def _names_to_index_keyed(optimizer_state: dict, names: list[str]) -> dict:
    """A name-keyed (FSDP) optimizer state as torch's `load_state_dict` takes it: parameters
    numbered in the trainable parameters' order, `_index_keyed_to_names` undone."""
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[name]: value for name, value in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [index[n] for n in group["params"]]}
                             for group in optimizer_state["param_groups"]]}


def refuse_earlier_checkpoints(config: TrainConfig) -> None:
    """Without --resume or --overwrite (which removes them before training), refuse an --output
    holding an earlier run's checkpoints: a new run would mix with them."""
    if config.resume or config.overwrite:
        return
    if checkpoints := list_checkpoints(config.output):
        raise ValueError(f"{config.output} holds checkpoints of an earlier run (latest: "
                         f"{checkpoints[-1][1].name}): pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --output")


def resume_from_checkpoint(state: TrainState, config: TrainConfig, console: Console) -> None:
    """With `resume`, load the latest checkpoint. (Without it, `train.check_output` has
    refused an --output with an old run's checkpoints before anything loaded.)"""
    if not config.resume:
        return
    checkpoints = list_checkpoints(config.output)
    if not checkpoints:
        if state.world.is_main:
            console.print(f"--resume: no checkpoint in {Path(config.output) / CHECKPOINTS}; "
                          "starting from step 0", markup=False)
        return
    step, path = checkpoints[-1]
    if state.world.is_main:
        for later in sorted(Path(config.output, CHECKPOINTS).glob("step-*")):
            number = later.name.removeprefix("step-")
            if number.isdigit() and int(number) > step:  # (it was passed over in silence)
                console.print(f"note: {later} has no trainer_state.json, so it is no whole "
                              f"checkpoint: resuming from {path.name} (it is written anew when "
                              "training gets there)", markup=False)
    try:
        state.start_step = load_checkpoint(state, config, path)
    except DamagedCheckpoint as error:
        earlier = (f"delete it to resume from the one before, {checkpoints[-2][1].name}"
                   if len(checkpoints) > 1 else "there is no earlier one: delete it to start "
                   "over from step 0")
        raise ValueError(f"{error}: {earlier}, or pass --overwrite to start a new "
                         "run") from error
    if state.world.is_main:
        console.print(f"resumed from {path} ({step} of {state.total_steps} steps done)",
                      markup=False)
        saved = json.loads((path / "trainer_state.json").read_text()).get("split")
        dropout_on = config.lora_dropout or (config.keep_dropout and state.model_dropout)
        if dropout_on and saved not in (None, _split(state, config)):
            console.print(
                f"note: the checkpoint's steps ran as micro-batches of {saved['micro_batch_size']}"
                f" x {saved['world_size']} process(es), this run's as "
                f"{config.micro_batch_size} x {state.world.world_size}: with dropout on "
                "(--lora-dropout, --keep-dropout) the masks fall on other samples, so the run "
                "goes on as an equally likely draw, not as the uninterrupted run would have",
                markup=False)


def _split(state: TrainState, config: TrainConfig) -> dict:
    """How a step's samples are split into forward passes. Accumulation is exact, so it may
    change on resume, but dropout draws its masks per forward pass."""
    return {"micro_batch_size": config.micro_batch_size,
            "world_size": state.world.world_size}


def trim_metrics(path: Path, first_step: int) -> float:
    """Drop metrics logged after the checkpoint a run resumes from (they will be redone); return
    the `elapsed` seconds of the last step kept (0 for none), which the resumed run goes on from."""
    if first_step == 0 or not path.exists():
        return 0.0
    kept, elapsed = [], 0.0
    for line in path.read_text(encoding="utf-8").splitlines():
        if (record := _metrics_record(line)) is not None and record["step"] < first_step:
            kept.append(line)
            if isinstance(record.get("elapsed"), int | float):
                elapsed = float(record["elapsed"])
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(temp, path)
    return elapsed



def _metrics_record(line: str) -> dict | None:
    """A metrics line, or None for a blank one or one cut off by a kill during its write."""
    try:
        record = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "step" in record else None
