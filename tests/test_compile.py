"""`--compile`: compiled decoder layers give the eager log-probs and gradients, and compile once.

These run torch.compile's CPU backend (a C++ compiler builds the kernels): the first compile of
the tiny model takes several seconds.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch._dynamo.utils import counters

import minorsft.compiling
import minorsft.train
from minorsft.attention import use_segment_attention
from minorsft.compiling import compile_model
from minorsft.logprobs import EAGER_HEAD, head_kernels, head_logps
from minorsft.packing import micro_batch_logps
from minorsft.train import TrainConfig, _compile_layers

from .conftest import build_tiny_model, build_tiny_tokenizer
from .test_logprobs import SAMPLES, TOL, _assert_same_grads
from .test_train_packing_lora import _train, tiny_cache  # noqa: F401 (a fixture)

CPU = torch.device("cpu")


def _rows(samples):
    return [{"input_ids": ids, "answer_mask": [bool(v) for v in mask]} for ids, mask in samples]


def _logps_and_grads(model, rows):
    model.zero_grad(set_to_none=True)
    logps, _ = micro_batch_logps(model, rows, 0, CPU, packing=True)
    weights = torch.linspace(-0.5, 2.0, len(rows))  # unequal, so a mix-up shows
    (logps * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def test_compiled_layers_equal_eager_and_compile_once():
    eager = build_tiny_model(build_tiny_tokenizer())
    assert use_segment_attention(eager)
    compiled = copy.deepcopy(eager)
    assert compile_model(compiled) == len(compiled.model.layers)
    assert head_kernels(compiled.lm_head) is not EAGER_HEAD
    assert head_kernels(eager.lm_head) is EAGER_HEAD
    graphs = []
    # Packed micro-batches of 4, 2 and 3 samples: new lengths and a new number of samples.
    for samples in (SAMPLES, SAMPLES[1:3], SAMPLES[:3]):
        rows = _rows(samples)
        got_logps, got_grads = _logps_and_grads(compiled, rows)
        want_logps, want_grads = _logps_and_grads(eager, rows)
        torch.testing.assert_close(got_logps, want_logps, **TOL)
        _assert_same_grads(got_grads, want_grads)
        graphs.append(counters["stats"]["unique_graphs"])
    # Dynamic shapes, and the sample lengths passed beside the model call: the first micro-batch
    # compiled the layers, the others reused that.
    assert graphs[0] > 0
    assert graphs[1] == graphs[2] == graphs[0]


class _LM(torch.nn.Module):
    """Just an output head (with a bias, which real heads rarely have, so its gradient is
    checked too), as `head_logps` sees a model."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        torch.manual_seed(3)
        self.head = torch.nn.Linear(hidden, vocab)

    def get_output_embeddings(self):
        return self.head


def _head_logps_and_grads(model, hidden, labels, sample_index, autocast):
    hidden = hidden.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logps = head_logps(model, hidden, labels, sample_index, 3, blocks=(4, 9))
    (logps * torch.tensor([1.0, -0.5, 2.0])).sum().backward()
    return logps.detach(), [hidden.grad, model.head.weight.grad, model.head.bias.grad]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_compiled_head_blocks_equal_the_closed_form_and_compile_once(autocast):
    """The compiled block kernels against the log-softmax formula (fp32) or the eager kernels
    under the same bf16 autocast (--dtype bf16-mixed), for three answer counts, in blocks of 4
    positions and 9 vocabulary entries (short last blocks both ways): one compile for all."""
    eager, compiled = _LM(8, 50), _LM(8, 50)
    from minorsft.logprobs import use_compiled_head

    use_compiled_head(compiled)
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if autocast else TOL
    before = counters["stats"]["unique_graphs"]
    graphs = []
    for count in (11, 7, 10):
        generator = torch.Generator().manual_seed(count)
        hidden = torch.randn(count, 8, generator=generator)
        labels = torch.randint(0, 50, (count,), generator=generator)
        sample_index = torch.sort(torch.randint(0, 3, (count,), generator=generator)).values
        got, got_grads = _head_logps_and_grads(compiled, hidden, labels, sample_index, autocast)
        if autocast:
            want, want_grads = _head_logps_and_grads(eager, hidden, labels, sample_index, True)
        else:  # sum of log_softmax(W h + b)[y] per sample, and autograd's gradients of it
            hidden = hidden.clone().requires_grad_()
            eager.zero_grad(set_to_none=True)
            token_logps = torch.log_softmax(eager.head(hidden), -1)[torch.arange(count), labels]
            want = torch.zeros(3).index_add(0, sample_index, token_logps)
            (want * torch.tensor([1.0, -0.5, 2.0])).sum().backward()
            want_grads = [hidden.grad, eager.head.weight.grad, eager.head.bias.grad]
        torch.testing.assert_close(got, want.detach(), **tolerance)
        for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(got_grad, want_grad, **tolerance)
        graphs.append(counters["stats"]["unique_graphs"])
    # One graph per direction, though every block has another vocabulary offset and the last
    # ones other sizes (a recompile per block would also hit dynamo's recompile limit and fall
    # back to eager), and no new graph for new answer counts.
    assert graphs[0] - before == 2
    assert graphs[1] == graphs[2] == graphs[0]


def test_training_with_compile_equals_eager(tiny_cache, tmp_path):  # noqa: F811
    eager = _train(tiny_cache, tmp_path / "eager", torch_compile=False)
    compiled = _train(tiny_cache, tmp_path / "compiled", torch_compile=True)
    for a, b in zip(eager, compiled, strict=True):
        for key in ("loss", "grad_norm", "policy_logps", "m_theta"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    # Compiling in place leaves the saved weights' names as they were.
    index = tmp_path / "compiled" / "model.safetensors"
    assert index.exists()
    from safetensors import safe_open

    with safe_open(str(index), "pt") as saved:
        assert not any("_orig_mod" in key for key in saved.keys())  # noqa: SIM118
    config = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert "compile" not in json.dumps(config)


def test_compile_settings(monkeypatch):
    model = build_tiny_model(build_tiny_tokenizer())
    cuda = torch.device("cuda")  # only compared, never used: no GPU needed
    # CPUs: compiled only when asked
    assert _compile_layers(model, None, CPU, fsdp=False) == "eager layers (the default on cpu)"
    assert _compile_layers(model, False, cuda, fsdp=False) == "eager layers (--no-compile)"
    assert _compile_layers(model, None, cuda, fsdp=True) == "eager layers (FSDP)"
    with pytest.raises(ValueError, match="--compile is for one process or DDP"):
        _compile_layers(model, True, CPU, fsdp=True)
    monkeypatch.setattr(minorsft.compiling, "triton_available", lambda: False)
    assert "needs Triton" in _compile_layers(model, None, cuda, fsdp=False)
    assert head_kernels(model.lm_head) is EAGER_HEAD
    assert not hasattr(model.model.layers[0], "_compiled_call_impl") or \
        model.model.layers[0]._compiled_call_impl is None
    # unasked, on a device in COMPILE_BY_DEVICE (CUDA; here the CPU stands in for it)
    monkeypatch.setattr(minorsft.compiling, "COMPILE_BY_DEVICE", frozenset({"cpu"}))
    assert "2 decoder layers and the output head's blocks compiled" in \
        _compile_layers(model, None, CPU, fsdp=False)
    assert model.model.layers[0]._compiled_call_impl is not None
    assert head_kernels(model.lm_head) is not EAGER_HEAD
    assert TrainConfig(cache="c", output="o").torch_compile is None


def test_a_compile_failure_names_the_way_out(tiny_cache, tmp_path, monkeypatch):  # noqa: F811
    from typer.testing import CliRunner

    from minorsft.cli import app

    def failing_step(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("simulated: inductor cannot build a kernel")

    monkeypatch.setattr(minorsft.train, "train_step", failing_step)
    result = CliRunner().invoke(app, ["train", "--cache", str(tiny_cache), "--output",
                                      str(tmp_path / "run"), "--max-steps", "1", "--compile",
                                      "--batch-size", "3", "--micro-batch-size", "3"])
    assert result.exit_code == 2
    assert "torch.compile failed" in result.output and "--no-compile" in result.output
    assert "simulated: inductor cannot build a kernel" in result.output
