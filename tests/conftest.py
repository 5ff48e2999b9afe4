"""Shared fixtures: a tiny random chat model built from a config (no downloads), demo rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Tom has 3 apples and buys 4 more, so he has 7 apples. The answer is 7.",
    "You are a helpful assistant. Answer in one short sentence, please.",
    "system user assistant question answer instruction input output response",
    "0 1 2 3 4 5 6 7 8 9 + - = x times plus minus how many are left in total",
]


def run_command(command: list[str], timeout: float, env: dict | None = None
                ) -> subprocess.CompletedProcess:
    """`command` run to its end with its output captured, as `subprocess.run(...,
    capture_output=True, text=True)`, but in a process group of its own that is killed whole
    when it runs past `timeout` (or the test stops otherwise): subprocess.run killed torchrun's
    launcher alone, and its ranks lived on after the test."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def build_tiny_tokenizer(extra_corpus: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer with a ChatML template, trained in milliseconds (on CORPUS and
    `extra_corpus`: words it holds become single tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS + list(extra_corpus), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_model(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """No test uses the Hugging Face hub: offline, as if the user said so (so that the hub
    probe of `models.check_hub_reachable` stays out of every test but its own)."""
    from minorsft.models import check_hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_hub_reachable.cache_clear()
    yield
    check_hub_reachable.cache_clear()


@pytest.fixture
def one_thread():
    """Run a test with one torch thread, restoring the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer folder that `--model` accepts."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


DEMO_ROWS = [
    {"id": "a", "messages": [{"role": "user", "content": "What is the capital of France?"},
                             {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"id": "b", "prompt": "Tom has 3 apples and buys 4 more.", "response": "He has 7 apples."},
    {"id": "c", "instruction": "Answer in one short sentence.", "input": "how many are left",
     "output": "3 are left in total."},
    {"id": "d", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "2 plus 3"}, {"role": "assistant", "content": "5"},
        {"role": "user", "content": "times 2"}, {"role": "assistant", "content": "10"}]},
]


def as_killed_after(run: Path, step: int, copy_to: Path | None = None) -> Path:
    """`run` (a finished 4-step run, or a copy of it at `copy_to`) as a kill right after its
    checkpoint of `step` would have left it: no later checkpoint, no model, no run_config.json
    (which a finished run writes last, and which makes --resume a no-op)."""
    import shutil

    if copy_to is not None:
        shutil.copytree(run, copy_to)
        run = copy_to
    for later in (run / "checkpoints").glob("step-*"):
        if int(later.name.removeprefix("step-")) > step:
            shutil.rmtree(later)
    for name in ("model.safetensors", "adapter_model.safetensors", "run_config.json"):
        (run / name).unlink(missing_ok=True)
    return run


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings for deliberately broken lines) as JSONL."""
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def demo_rows(copies: int) -> list[dict]:
    """`copies` copies of DEMO_ROWS with unique ids (a0, b0, c0, d0, a1, ...)."""
    return [dict(row, id=f"{row['id']}{copy}") for copy in range(copies) for row in DEMO_ROWS]


def precompute_rows(model: str, folder: Path, rows: list[dict], **settings) -> Path:
    """Write `rows` as JSONL in `folder` and precompute them quietly into folder/ref.parquet."""
    from rich.console import Console

    from minorsft.precompute import PrecomputeConfig, run_precompute

    data = write_jsonl(folder / "sft.jsonl", rows)
    cache = folder / "ref.parquet"
    run_precompute(PrecomputeConfig(model=model, data=str(data), out=str(cache), **settings),
                   Console(quiet=True))
    return cache


@pytest.fixture
def demo_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "sft.jsonl", demo_rows(4))


@pytest.fixture
def model(tiny_tokenizer):
    """A fresh tiny model (seed 3) with SDPA attention, in train mode."""
    m = build_tiny_model(tiny_tokenizer, seed=3)
    m.set_attn_implementation("sdpa")
    return m.train()
