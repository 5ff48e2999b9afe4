"""torchrun on the CPU (gloo): 2 processes x micro-batch B == 1 process x micro-batch 2B.

Same losses and metrics at every step, and the same final weights, for DDP and FSDP2 and for
raw SFT and MinorSFT. Each process group runs in its own subprocess, as users launch it.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from minorsft.train import TrainConfig, run_train

from .conftest import DEMO_ROWS, as_killed_after, demo_rows, precompute_rows, run_command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    # 17 rows, batch 8: the last step has one sample, so one rank has none and must still join
    # in with a zero-weight forward/backward (else the collectives would hang).
    return precompute_rows(str(tiny_model_dir), folder, demo_rows(5)[:17])


COMMON = ["--batch-size", "8", "--lr", "1e-3", "--warmup-ratio", "0", "--seed", "5"]


def torchrun_train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`minorsft train ARGS` under torchrun, 2 processes on the CPU (gloo), one thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "minorsft", "train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return run_command(command, timeout=timeout, env=env)


def read_run(folder):
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return metrics, load_file(folder / "model.safetensors")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("loss", ["minorsft", "sft"])
def test_two_processes_match_one(cache, tmp_path, loss, strategy):
    single = tmp_path / "single"
    run_train(TrainConfig(cache=str(cache), output=str(single), loss=loss, batch_size=8,
                          micro_batch_size=4, lr=1e-3, warmup_ratio=0.0, seed=5),
              Console(quiet=True))
    multi = tmp_path / "multi"
    # under FSDP a micro-batch of 8, more than a process's share of the step (4): it runs as
    # that share (it was refused, 8 not dividing 8 x 2 processes)
    micro = "2" if strategy == "ddp" else "8"
    result = torchrun_train("--cache", str(cache), "--output", str(multi), "--loss", loss,
                            "--strategy", strategy, "--micro-batch-size", micro, *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr

    single_metrics, single_weights = read_run(single)
    multi_metrics, multi_weights = read_run(multi)
    assert len(single_metrics) == len(multi_metrics) == 3
    assert multi_metrics[0]["world_size"] == 2
    for one, two in zip(single_metrics, multi_metrics, strict=True):
        for key in ("loss", "nll", "m_theta", "coefficient", "grad_norm", "samples", "tokens"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    assert single_weights.keys() == multi_weights.keys()
    for name, value in single_weights.items():
        torch.testing.assert_close(multi_weights[name], value, rtol=1e-4, atol=1e-5)


def test_uneven_micro_batch_counts_on_a_short_last_batch_do_not_hang(tiny_model_dir, tmp_path):
    """19 rows, batch 8: the last step has 3 rows, 2 for rank 0 and 1 for rank 1. At micro-batch
    1 rank 1 ran one micro-batch fewer, and FSDP2's collectives waited for it forever."""
    cache = precompute_rows(str(tiny_model_dir), tmp_path, demo_rows(5)[:19])
    single = tmp_path / "single"
    run_train(TrainConfig(cache=str(cache), output=str(single), batch_size=8, micro_batch_size=4,
                          lr=1e-3, warmup_ratio=0.0, seed=5), Console(quiet=True))
    multi = tmp_path / "multi"
    result = torchrun_train("--cache", str(cache), "--output", str(multi), "--strategy", "fsdp",
                            "--micro-batch-size", "1", *COMMON, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    single_metrics, single_weights = read_run(single)
    multi_metrics, multi_weights = read_run(multi)
    assert [m["samples"] for m in multi_metrics] == [8, 8, 3]
    for one, two in zip(single_metrics, multi_metrics, strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-6)
    for name, value in single_weights.items():
        torch.testing.assert_close(multi_weights[name], value, rtol=1e-4, atol=1e-5)


def test_fsdp_saves_tied_embeddings_once(tiny_tokenizer, tmp_path):
    """A model whose output head is its input embedding (SmolLM2, Qwen2-0.5B) came out of an
    FSDP run with a second copy of the matrix as lm_head.weight; one process saves it once."""
    from transformers import AutoModelForCausalLM

    from .conftest import build_tiny_model

    model = build_tiny_model(tiny_tokenizer)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    folder = tmp_path / "tied"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    cache = precompute_rows(str(folder), tmp_path, demo_rows(2))
    single = tmp_path / "single"
    run_train(TrainConfig(cache=str(cache), output=str(single), batch_size=8,
                          micro_batch_size=4, lr=1e-3, warmup_ratio=0.0, seed=5),
              Console(quiet=True))
    multi = tmp_path / "multi"
    result = torchrun_train("--cache", str(cache), "--output", str(multi), "--strategy", "fsdp",
                            "--micro-batch-size", "2", *COMMON, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    single_weights, multi_weights = read_run(single)[1], read_run(multi)[1]
    assert "lm_head.weight" not in multi_weights
    assert multi_weights.keys() == single_weights.keys()
    for name, value in single_weights.items():
        torch.testing.assert_close(multi_weights[name], value, rtol=1e-4, atol=1e-5)
    reloaded = AutoModelForCausalLM.from_pretrained(multi)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_an_error_under_torchrun_is_each_ranks_one_line_and_exit_code(tmp_path):
    """Each rank says the error once and exits with its code (2), promptly: the process group
    is left to the process's end, not torn down where the other rank may be waiting."""
    result = torchrun_train("--cache", str(tmp_path / "none.parquet"), "--output",
                            str(tmp_path / "run"), timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("error: ") == 2 and "no such cache" in result.stderr
    assert result.stderr.count("exitcode  : 2") == 2, result.stderr[-2000:]


def test_lora_under_fsdp_saves_adapters_and_the_merged_model(cache, tmp_path):
    """The FSDP run trained, then crashed at the save: peft was handed the sharded adapters
    (and a sharded model cannot merge in place)."""
    lora = ["--lora-r", "4", "--lora-alpha", "8", "--merge-lora"]
    single = tmp_path / "single"
    run_train(TrainConfig(cache=str(cache), output=str(single), batch_size=8, micro_batch_size=4,
                          lr=1e-3, warmup_ratio=0.0, seed=5, lora_r=4, lora_alpha=8.0,
                          merge_lora=True), Console(quiet=True))
    multi = tmp_path / "multi"
    result = torchrun_train("--cache", str(cache), "--output", str(multi), "--strategy", "fsdp",
                            "--micro-batch-size", "2", *lora, *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("adapter_model.safetensors", "merged/model.safetensors"):
        one, two = load_file(single / name), load_file(multi / name)
        assert one.keys() == two.keys(), name
        for key, value in one.items():
            torch.testing.assert_close(two[key].to(value.dtype), value, rtol=1e-4, atol=1e-5)


def test_ddp_resume_with_dropout_continues_every_ranks_random_stream(cache, tmp_path):
    """Checkpoints kept rank 0's RNG states only, and every rank took them on resume: with
    dropout (here LoRA's), rank 1's masks after resuming differed from the uninterrupted run."""

    run = tmp_path / "run"
    settings = ["--cache", str(cache), "--strategy", "ddp", "--micro-batch-size", "2",
                "--lora-r", "4", "--lora-dropout", "0.3", "--save-every", "2",
                "--max-steps", "4", *COMMON]

    def torchrun(*extra):
        result = torchrun_train("--output", str(run), *settings, *extra)
        assert result.returncode == 0, result.stderr[-3000:]

    torchrun()
    whole = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    adapters = load_file(run / "adapter_model.safetensors")
    as_killed_after(run, 2)
    torchrun("--resume")
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [0, 1, 2, 3]
    for one, two in zip(whole, resumed, strict=True):
        assert two["loss"] == one["loss"] and two["grad_norm"] == one["grad_norm"]
    for name, value in load_file(run / "adapter_model.safetensors").items():
        assert torch.equal(value, adapters[name]), name


def test_ranks_draw_their_own_dropout_masks(tiny_model_dir, tmp_path):
    """Each rank seeded its RNG alike, so two ranks with rows of the same length drew the same
    dropout masks: the same noise on different samples, which their gradients then averaged."""
    same_length = [dict(DEMO_ROWS[0], id=f"row{i}") for i in range(8)]
    cache = precompute_rows(str(tiny_model_dir), tmp_path, same_length)
    run = tmp_path / "run"
    result = torchrun_train("--cache", str(cache), "--output", str(run), "--strategy", "ddp",
                            "--micro-batch-size", "2", "--lora-r", "4", "--lora-dropout", "0.3",
                            "--save-every", "1", "--max-steps", "1", *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = torch.load(run / "checkpoints" / "step-1" / "rng.pt", weights_only=True)["ranks"]
    assert len(ranks) == 2
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_held_out_evaluations_under_torchrun_and_fsdp_cpu_offload_on_a_cpu(
        strategy, cache, tiny_model_dir, tmp_path):
    """The ranks share the held-out micro-batches (9 rows, 3 micro-batches: rank 1 repeats one
    to keep FSDP's and DDP's forwards in step) and rank 0 writes what they add up to: the
    records of one process. --cpu-offload on a CPU run was a RuntimeError ("Cannot access
    accelerator device") and is now ignored."""
    (tmp_path / "held").mkdir()
    held = precompute_rows(str(tiny_model_dir), tmp_path / "held",
                           [{"id": f"h{n}", "prompt": f"{n} plus 1", "response": f"{n + 1}."}
                            for n in range(9)])
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_train(TrainConfig(cache=str(cache), output=str(single), batch_size=8,
                          micro_batch_size=4, lr=1e-3, warmup_ratio=0.0, seed=5,
                          eval_cache=str(held), eval_every=2), Console(quiet=True))
    offload = ["--cpu-offload"] if strategy == "fsdp" else []
    result = torchrun_train("--cache", str(cache), "--output", str(multi), "--strategy",
                            strategy, *offload, "--micro-batch-size", "4", "--eval-cache",
                            str(held), "--eval-every", "2", *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    if offload:
        assert "--cpu-offload moves FSDP's state off a GPU" in " ".join(result.stderr.split())

    def records(run):
        return [json.loads(line) for line in (run / "eval_metrics.jsonl").read_text().splitlines()]

    one, two = records(single), records(multi)
    assert [r["step"] for r in two] == [0, 2, 3] == [r["step"] for r in one]
    for a, b in zip(one, two, strict=True):
        assert b["m_theta"] == pytest.approx(a["m_theta"], abs=1e-5)
        assert b["nll_per_token"] == pytest.approx(a["nll_per_token"], rel=1e-5)
