"""The vLLM engine's answer picking, without vLLM: which prompt log-probs make an answer's sum.

vLLM's `prompt_logprobs[t]` is the log-prob of the token at position t given the tokens before
it (None at t = 0). The answer's log-probs are those at the answer positions t themselves; one
position early would score each answer token by the prediction of the token before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from minorsft.data import Example
from minorsft.engines.vllm_engine import _answer_token_logps


@dataclass
class Logprob:  # the one field of vLLM's Logprob that is read
    logprob: float


def fake_prompt_logprobs(input_ids, vocab=10):
    """Every position holds every token id (as with top-k > 0), each with a value that names its
    position and token, so picking the wrong position gives a wrong number, not a KeyError."""
    return [None] + [{token: Logprob(-(position + token / 100)) for token in range(vocab)}
                     for position in range(1, len(input_ids))]


def test_answer_log_probs_are_taken_at_the_answer_positions():
    example = Example(id="x", line=1, input_ids=[1, 4, 2, 7, 3, 9],
                      answer_mask=[False, False, False, True, True, False])
    picked = _answer_token_logps(example, fake_prompt_logprobs(example.input_ids))
    # position 3 holds token 7, position 4 token 3
    assert picked == pytest.approx([-3.07, -4.03])


def test_an_answer_ending_the_sequence_and_its_errors():
    example = Example(id="y", line=2, input_ids=[5, 6, 8], answer_mask=[False, True, True])
    assert _answer_token_logps(example, fake_prompt_logprobs([5, 6, 8])) == pytest.approx(
        [-1.06, -2.08])
    with pytest.raises(RuntimeError, match="no prompt log-probs for row 2"):
        _answer_token_logps(example, fake_prompt_logprobs([5, 6]))  # one position short
    first = Example(id="z", line=3, input_ids=[5, 6], answer_mask=[True, True])
    with pytest.raises(ValueError, match="first token cannot be an answer token"):
        _answer_token_logps(first, fake_prompt_logprobs([5, 6]))


def test_vllm_may_take_one_past_the_models_limit_and_no_more(tiny_model_dir, monkeypatch,
                                                           tmp_path):
    """A sample of the model's full length needs max_model_len = limit + 1 (vLLM counts the token
    it generates), which vLLM refuses unless VLLM_ALLOW_LONG_MAX_MODEL_LEN is set: --max-length
    equal to the model's context could score no row that long."""
    import os

    from minorsft.engines.vllm_engine import _one_past_the_model_limit

    name = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"
    monkeypatch.delenv(name, raising=False)
    with _one_past_the_model_limit(str(tiny_model_dir), 513):  # its limit is 512
        assert os.environ[name] == "1"
    assert name not in os.environ
    for other in (None, 512, 514):
        with _one_past_the_model_limit(str(tiny_model_dir), other):
            assert name not in os.environ
    monkeypatch.setenv(name, "0")  # the user's own setting comes back
    with _one_past_the_model_limit(str(tiny_model_dir), 513):
        assert os.environ[name] == "1"
    assert os.environ[name] == "0"
    # a yarn model's context is what vLLM derives: 2 x 512 here, so 1025 is its limit + 1
    import json
    import shutil

    yarn = tmp_path / "yarn"
    shutil.copytree(tiny_model_dir, yarn)
    config = json.loads((yarn / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0,
                              "original_max_position_embeddings": 512}
    (yarn / "config.json").write_text(json.dumps(config))
    monkeypatch.delenv(name)
    with _one_past_the_model_limit(str(yarn), 1025):
        assert os.environ[name] == "1"
    with _one_past_the_model_limit(str(yarn), 513):
        assert name not in os.environ


def test_vllm_failing_to_start_is_one_line_not_a_traceback(monkeypatch, tmp_path):
    """vLLM's engine core dies in its own process and vLLM raises a bare RuntimeError, which
    the command line printed as a traceback."""
    from typer.testing import CliRunner

    import minorsft.engines.vllm_engine as vllm_engine
    from minorsft.cli import app

    class FailingEngine:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Engine core initialization failed. See root cause above.")

    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_engine, "VLLMEngine", FailingEngine)
    result = CliRunner().invoke(app, ["precompute", "--engine", "vllm", "--data", "demo",
                                      "--out", str(tmp_path / "c")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "vLLM did not start: Engine core initialization failed" in text
    assert not (tmp_path / "c").exists()
