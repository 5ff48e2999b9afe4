"""--dtype bf16-mixed: fp32 weights, forward and backward under bf16 autocast (scoring too).

The blocked output head is a custom autograd function whose backward recomputes the logits;
under autocast it must recompute them as the forward computed them (in bf16), or its gradient
would belong to another function than the loss. The reference is the naive full-logits formula
with plain autograd, under the same autocast.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from minorsft.jsonl import json_safe
from minorsft.packing import micro_batch_logps
from minorsft.train import TrainConfig, run_train

from .conftest import as_killed_after, demo_rows, precompute_rows
from .test_attention import CPU, _rows
from .test_logprobs import _grads, _naive


def _relative(got, want):
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("packing", [False, True])
def test_chunked_head_under_autocast_equals_autograd(model, packing):
    with torch.no_grad():
        exact = _naive(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _naive(model)
    assert (want - exact).abs().max() > 1e-3  # autocast changed the numbers: not a no-op test
    want_grads = _grads(model, want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = micro_batch_logps(model, _rows(), 0, CPU, packing)
    got_grads = _grads(model, got)
    # Padded, the decoder runs the same kernels as the reference: below the head everything
    # must agree to float rounding (measured 0; with the head's backward outside autocast
    # 4.5e-3). Packed rows take other attention kernels: bf16-level agreement (2e-3 measured).
    close = 1e-4 if not packing else 1e-2
    torch.testing.assert_close(got, want.detach(), atol=close, rtol=0)
    for name, grad in want_grads.items():
        # the head's weight gradient is summed in fp32 here, in bf16 by autograd (2.8e-3)
        bound = 1e-2 if name == "lm_head.weight" else close
        assert _relative(got_grads[name], grad) < bound, name


def test_train_bf16_mixed_keeps_fp32_weights_and_checks_step0(tiny_model_dir, tmp_path):
    cache = precompute_rows(str(tiny_model_dir), tmp_path, demo_rows(2))
    settings = dict(cache=str(cache), batch_size=4, micro_batch_size=2, lr=1e-3, max_steps=2,
                    dtype="bf16-mixed", save_every=1)
    history = run_train(TrainConfig(output=str(tmp_path / "run"), **settings))
    assert len(history) == 2
    # step 0: the policy is the reference, up to bf16 autocast against the fp32 cache
    assert 0 < abs(history[0]["m_theta"]) < 0.1
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    run_config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert run_config["dtype"] == "bf16-mixed"
    with pytest.raises(ValueError, match="dtype: 'bf16-mixed' -> 'float32'"):
        run_train(TrainConfig(output=str(tmp_path / "run"), resume=True,
                              **dict(settings, dtype="float32")))


def test_precompute_in_bf16_mixed_scores_under_autocast(tiny_model_dir, tmp_path):
    from minorsft.cache import iter_rows, read_metadata
    from minorsft.logprobs import answer_logps, pad_batch
    from minorsft.models import load_model

    cache = precompute_rows(str(tiny_model_dir), tmp_path, demo_rows(1), dtype="bf16-mixed",
                            verify_dtype="bf16-mixed", verify_sample=4)
    metadata = read_metadata(cache)
    assert metadata["dtype"] == "bf16-mixed"
    # the drift check reused the engine: both sides bf16-mixed, agreeing to batching noise
    assert metadata["drift"]["trainer"]["dtype"] == "bf16-mixed"
    assert metadata["drift"]["delta_r_abs"]["max"] < 1e-3
    rows = list(iter_rows(cache))
    model = load_model(str(tiny_model_dir), torch.float32, CPU).eval()
    tensors = pad_batch([r["input_ids"] for r in rows], [r["answer_mask"] for r in rows],
                        model.config.pad_token_id or 0, CPU)
    with torch.inference_mode():
        exact = answer_logps(model, *tensors)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = answer_logps(model, *tensors)
    cached = torch.tensor([r["ref_logps"] for r in rows])
    assert (mixed - exact).abs().max() > 1e-3  # the two precisions differ here
    torch.testing.assert_close(cached, mixed, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("has_bf16", "dtype", "hinted", "warned"), [
    (True, "auto", True, False), (False, "auto", False, False), (True, "float32", False, False),
    (False, "bf16-mixed", False, True), (True, "bf16-mixed", False, False),
    (False, "bf16", False, True)])
def test_cpus_with_bf16_get_a_hint_about_bf16_mixed(tiny_model_dir, tmp_path, monkeypatch,
                                                     has_bf16, dtype, hinted, warned):
    """... and CPUs without them a note when bf16 is asked for (emulated: >16 x slower on one,
    docs/performance.md 2b; it said nothing)."""
    from rich.console import Console

    monkeypatch.setattr("minorsft.train.cpu_has_bf16", lambda: has_bf16)
    cache = precompute_rows(str(tiny_model_dir), tmp_path, demo_rows(1))
    console = Console(record=True, width=200)
    run_train(TrainConfig(cache=str(cache), output=str(tmp_path / "run"), batch_size=4,
                          micro_batch_size=4, max_steps=1, dtype=dtype, device="cpu"), console)
    said = console.export_text()
    assert ("--dtype bf16-mixed" in said) == hinted
    assert ("this CPU has no bf16 instructions" in said) == warned


# --- fp16-mixed: fp16 autocast with dynamic loss scaling -----------------------------------------

def _fp16_mixed_state(cache, output, **settings):
    from rich.console import Console

    from minorsft.train import setup

    config = TrainConfig(cache=str(cache), output=str(output), dtype="fp16-mixed",
                         batch_size=6, micro_batch_size=3, warmup_ratio=0.0, **settings)
    return setup(config, Console(quiet=True)), config


def test_fp16_mixed_unscales_to_the_paper_gradient(tiny_model_dir, tmp_path):
    """The loss is multiplied by the scale before backward; what the optimizer gets must be the
    gradient of the unscaled mean loss (fp16 rounding aside)."""
    from minorsft.train import train_step, training_batches

    from .test_accumulation import (
        paper_mean_loss_gradient,
        record_gradients_away_from_the_reference,
    )

    cache = precompute_rows(str(tiny_model_dir), tmp_path, demo_rows(2))
    state, config = _fp16_mixed_state(cache, tmp_path / "run", max_grad_norm=1e12)
    assert state.scaler is not None and state.dtype == torch.float32
    record_gradients_away_from_the_reference(state)
    rows = next(training_batches(cache, 3, True, 64, 1, 5))
    want = paper_mean_loss_gradient(state.model, rows, config.loss, config.beta)
    metrics = train_step(state, config, rows)
    assert metrics["loss_scale"] == 2.0**16 and metrics["skipped_step"] is False
    for parameter, expected in zip(state.model.parameters(), want, strict=True):
        got = state.optimizer.seen[id(parameter)].double()
        # scaled, it would be 65536 times too large; fp16 matmuls round to about 1e-3
        assert (got - expected).abs().max() <= 2e-2 * expected.abs().max() + 1e-9


def test_fp16_mixed_skips_a_step_whose_gradients_overflow(tiny_model_dir, tmp_path):
    from minorsft.train import check_finite, train_step, training_batches

    cache = precompute_rows(str(tiny_model_dir), tmp_path, demo_rows(2))
    state, config = _fp16_mixed_state(cache, tmp_path / "run")
    state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # fp16 gradients: inf
    before = [p.detach().clone() for p in state.model.parameters()]
    metrics = train_step(state, config, next(training_batches(cache, 3, True, 64, 1, 6)))
    assert metrics["skipped_step"] is True and not math.isfinite(metrics["grad_norm"])
    assert state.scaler.get_scale() == 2.0**99
    check_finite(metrics, 0)  # a skipped step is not a divergence
    for old, new in zip(before, state.model.parameters(), strict=True):
        assert torch.equal(old, new)
    json.loads(json.dumps(json_safe(metrics), allow_nan=False))  # what metrics.jsonl gets


def test_fp16_mixed_trains_saves_fp32_and_resumes_its_loss_scale(tiny_model_dir, tmp_path):
    cache = precompute_rows(str(tiny_model_dir), tmp_path, demo_rows(2))
    settings = dict(cache=str(cache), batch_size=4, micro_batch_size=2, lr=1e-3,
                    dtype="fp16-mixed", save_every=1)
    output = tmp_path / "run"
    run_train(TrainConfig(output=str(output), max_steps=3, **settings))
    as_killed_after(output, 2)
    checkpoint = output / "checkpoints" / "step-2"
    scaler = torch.load(checkpoint / "scaler.pt", weights_only=True)
    scaler["scale"] = 1024.0  # as if overflows had lowered it: the resumed run must go on from it
    torch.save(scaler, checkpoint / "scaler.pt")
    history = run_train(TrainConfig(output=str(output), max_steps=3, resume=True, **settings))
    assert [h["step"] for h in history] == [2] and history[0]["loss_scale"] == 1024.0
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    from safetensors.torch import load_file

    saved = load_file(output / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    assert json.loads((output / "run_config.json").read_text())["dtype"] == "fp16-mixed"
