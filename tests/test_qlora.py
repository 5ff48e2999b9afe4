"""--load-in-4bit (QLoRA): LoRA adapters on a base whose linear layers are 4-bit NF4
(bitsandbytes, which runs on the CPU too), against a cache scored under that same 4-bit model."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from minorsft.cache import CacheError
from minorsft.checkpoints import TrainingInterrupted
from minorsft.cli import app
from minorsft.train import TrainConfig, run_train

from .conftest import demo_rows, precompute_rows
from .test_train_resume import interrupt_after

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def caches(tiny_model_dir, tmp_path_factory):
    """The same rows scored under the tiny model in 4-bit and as it is."""
    folder = tmp_path_factory.mktemp("qlora")
    (folder / "nf4").mkdir()
    (folder / "full").mkdir()
    rows = demo_rows(8)
    return (precompute_rows(str(tiny_model_dir), folder / "nf4", rows, load_in_4bit=True,
                            max_batch_tokens=256),
            precompute_rows(str(tiny_model_dir), folder / "full", rows, max_batch_tokens=256))


def qlora(cache, output, **settings) -> TrainConfig:
    return TrainConfig(**{"cache": str(cache), "output": str(output), "batch_size": 4,
                          "micro_batch_size": 2, "lr": 1e-3, "warmup_ratio": 0.0,
                          "max_steps": 4, "lora_r": 4, "load_in_4bit": True, **settings})


def metrics(output) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_a_4bit_layer_passes_the_gradient_of_its_dequantized_weights(tiny_model_dir):
    """torch warns that bitsandbytes' 4-bit matrix-vector op (a single row) has no autograd
    kernel and may give "silently incorrect" gradients; LoRA needs the gradient through every
    frozen 4-bit layer to reach the adapters below it. On the tiny model's layers it is the
    dequantized weights' exactly, for one row and for many, so train silences that warning.
    (On larger layers bitsandbytes' CPU kernels compute at about bf16's precision:
    `python benchmarks/bench_qlora.py --layer-check`; a 4-bit run's step-0 check allows for it.)"""
    import bitsandbytes.functional as functional
    from transformers import AutoModelForCausalLM

    from minorsft.models import four_bit_config

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=four_bit_config(torch.float32))
    layer = model.model.layers[0].mlp.up_proj
    weight = functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    torch.manual_seed(0)
    for shape in [(1, 1), (1, 5), (3, 7)]:
        inputs = torch.randn(*shape, weight.shape[1], requires_grad=True)
        outputs = layer(inputs)
        assert torch.allclose(outputs, inputs @ weight.T, atol=1e-6)
        upstream = torch.randn_like(outputs)
        (outputs * upstream).sum().backward()
        assert torch.allclose(inputs.grad, upstream @ weight, atol=1e-6), shape


def test_qlora_starts_at_its_4bit_reference_trains_resumes_and_merges(caches, tmp_path,
                                                                     monkeypatch):
    nf4, _ = caches
    run_train(qlora(nf4, tmp_path / "whole", merge_lora=True), QUIET)
    whole = metrics(tmp_path / "whole")
    # the cache is the policy's own 4-bit model at step 0: r = 0 (the step-0 check passed too)
    assert abs(whole[0]["m_theta"]) < 1e-6 and whole[0]["coefficient"] == pytest.approx(0.5)
    assert abs(whole[-1]["m_theta"]) > 1e-4  # and the adapters learn
    adapters = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    assert adapters and all("lora_" in name for name in adapters)
    # the merged model is the base read again as it is, not in 4-bit: a plain model
    merged = tmp_path / "whole" / "merged"
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    weights = load_file(merged / "model.safetensors")
    assert all(value.dtype == torch.float32 for value in weights.values())
    # Ctrl-C and resume: the same steps and adapters as the run without the stop
    interrupt_after(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        run_train(qlora(nf4, tmp_path / "stopped"), QUIET)
    monkeypatch.undo()
    # (the rest of the run on the base as it is: refused, --allow-mismatch or not)
    with pytest.raises(ValueError, match="settings differ:\n  load_in_4bit: checkpoint True, "
                                         "this run False"):
        run_train(qlora(nf4, tmp_path / "stopped", resume=True, load_in_4bit=False,
                        allow_mismatch=True), QUIET)
    run_train(qlora(nf4, tmp_path / "stopped", resume=True), QUIET)
    for one, two in zip(whole, metrics(tmp_path / "stopped"), strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    resumed = load_file(tmp_path / "stopped" / "adapter_model.safetensors")
    for name, value in adapters.items():
        assert torch.allclose(resumed[name], value, atol=1e-6), name


def test_a_cache_of_other_quantization_is_refused_before_the_model_loads(caches, tiny_model_dir,
                                                                         tmp_path):
    nf4, full = caches
    with pytest.raises(CacheError, match="not in 4-bit; the reference must be the model the "
                                         "policy starts from: score it with `minorsft "
                                         "precompute --load-in-4bit`"):
        run_train(qlora(full, tmp_path / "a"), QUIET)
    with pytest.raises(CacheError, match=r"scored under the model in 4-bit \(nf4\), the base "
                                         "of a QLoRA run: train with --load-in-4bit"):
        run_train(TrainConfig(cache=str(nf4), output=str(tmp_path / "b"), lora_r=4), QUIET)
    with pytest.raises(ValueError, match="--load-in-4bit trains LoRA adapters on the 4-bit "
                                         "base .*: give --lora-r"):
        TrainConfig(cache=str(nf4), output=str(tmp_path / "c"), load_in_4bit=True)
    assert not any((tmp_path / name).exists() for name in "abc")
    # held-out rows scored as they are, for a 4-bit run: its m_theta is against another model
    from minorsft.heldout import read_heldout

    held = precompute_rows(str(tiny_model_dir), tmp_path,
                           [{"id": f"h{n}", "prompt": f"{n} plus 1", "response": f"{n + 1}."}
                            for n in range(3)])
    _, note = read_heldout(held, nf4, None)
    assert "(float32), the training cache under" in note and "(float32, nf4)" in note


def test_precompute_verify_and_cache_info_keep_the_quantization(caches, tiny_model_dir,
                                                                tmp_path):
    nf4, full = caches
    runner = CliRunner()
    # a 4-bit run's step-0 check allows for bitsandbytes' precision (about bf16's)
    result = runner.invoke(app, ["train", "--cache", str(nf4), "--output", str(tmp_path / "r"),
                                 "--load-in-4bit", "--lora-r", "4", "--max-steps", "1"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "(tolerance 0.1)" in text, text
    assert "rows, engine transformers, float32, 4-bit nf4)" in text
    # eval loads models as they are: against a 4-bit cache it says so
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--reference",
                                 str(nf4)])
    assert result.exit_code == 0 and "reference cache scored under the model in 4-bit (nf4), " \
        "this model as it is" in " ".join(result.output.split())
    result = runner.invoke(app, ["cache", "info", str(nf4)])
    assert result.exit_code == 0 and "quantization: nf4" in result.output
    assert "quantization" not in runner.invoke(app, ["cache", "info", str(full)]).output
    # verify recomputes with the 4-bit model the cache was scored with: no drift to speak of
    result = runner.invoke(app, ["verify", "--cache", str(nf4), "--sample", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["delta_r_abs"]["max"] < 1e-4 and report["reference"]["quantization"] == "nf4"
    # a resume without --load-in-4bit would mix full and 4-bit parts: refused
    data = nf4.parent / "sft.jsonl"
    result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                 str(data), "--out", str(nf4), "--max-batch-tokens", "256"])
    assert result.exit_code == 2 and "quantization: 'nf4' -> None" in result.output
    result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                 str(data), "--out", str(tmp_path / "v"), "--engine", "vllm",
                                 "--load-in-4bit"])
    assert result.exit_code == 2 and "--load-in-4bit scores with the transformers engine" in \
        " ".join(result.output.split())


def test_qlora_under_ddp_takes_the_steps_of_one_process(caches, tmp_path):
    from .test_distributed import torchrun_train

    nf4, _ = caches
    run_train(qlora(nf4, tmp_path / "one"), QUIET)
    result = torchrun_train("--cache", str(nf4), "--output", str(tmp_path / "two"),
                            "--load-in-4bit", "--lora-r", "4", "--batch-size", "4",
                            "--micro-batch-size", "2", "--max-steps", "4", "--lr", "1e-3",
                            "--warmup-ratio", "0", "--strategy", "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    for one, two in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    result = torchrun_train("--cache", str(nf4), "--output", str(tmp_path / "fsdp"),
                            "--load-in-4bit", "--lora-r", "4", "--batch-size", "4",
                            "--strategy", "fsdp")
    assert result.returncode != 0 and "FSDP does not shard 4-bit weights" in result.stderr


@pytest.mark.parametrize("four_bit", [True, False], ids=["qlora", "lora"])
def test_eval_scores_a_lora_run_as_it_trained(caches, tiny_model_dir, tmp_path, four_bit):
    """`eval --model <a LoRA run>` loads the base (in 4-bit for a QLoRA run) with the adapters
    unmerged: the held-out m_theta is the one training logged for its last step."""
    nf4, full = caches
    rows = [{"id": f"h{n}", "prompt": f"What is {n} plus {n}?", "response": f"{2 * n}, I think."}
            for n in range(5)]
    held = precompute_rows(str(tiny_model_dir), tmp_path, rows, load_in_4bit=four_bit)
    run = tmp_path / "run"
    run_train(qlora(nf4 if four_bit else full, run, load_in_4bit=four_bit, lr=3e-3,
                    eval_cache=str(held)), QUIET)
    trained = [json.loads(line) for line in (run / "eval_metrics.jsonl").read_text().splitlines()]
    assert trained[-1]["step"] == 4 and abs(trained[-1]["m_theta"]) > 1e-3
    result = CliRunner().invoke(app, ["eval", "--model", str(run), "--reference", str(held),
                                      "--json"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"LoRA adapters, scored unmerged on their base {tiny_model_dir}" in text
    assert (" in 4-bit nf4 (QLoRA)" in text) == four_bit
    assert "m_theta includes that difference" not in text  # (the cache's kind is the run's)
    report = json.loads(result.output[result.output.index("{\n"):])
    assert report["adapters_on"] == {"base": str(tiny_model_dir),
                                     "quantization": "nf4" if four_bit else None}
    assert report["heldout"]["m_theta"] == pytest.approx(trained[-1]["m_theta"], abs=1e-5)
    assert report["heldout"]["nll_per_token"] == pytest.approx(trained[-1]["nll_per_token"],
                                                               abs=1e-5)
