"""--dtype bf16-mixed: fp32 weights, forward and backward under bf16 autocast (scoring too).

The blocked output head is a custom autograd function whose backward recomputes the logits;
under autocast it must recompute them as the forward computed them (in bf16), or its gradient
would belong to another function than the loss. The reference is the naive full-logits formula
with plain autograd, under the same autocast.
"""

from __future__ import annotations

import json

import pytest
import torch

from minorsft.packing import micro_batch_logps
from minorsft.train import TrainConfig, run_train

from .conftest import demo_rows, precompute_rows
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


@pytest.mark.parametrize(("has_bf16", "dtype", "hinted"), [
    (True, "auto", True), (False, "auto", False), (True, "float32", False)])
def test_cpus_with_bf16_get_a_hint_about_bf16_mixed(tiny_model_dir, tmp_path, monkeypatch,
                                                     has_bf16, dtype, hinted):
    from rich.console import Console

    monkeypatch.setattr("minorsft.train.cpu_has_bf16", lambda: has_bf16)
    cache = precompute_rows(str(tiny_model_dir), tmp_path, demo_rows(1))
    console = Console(record=True, width=200)
    run_train(TrainConfig(cache=str(cache), output=str(tmp_path / "run"), batch_size=4,
                          micro_batch_size=4, max_steps=1, dtype=dtype, device="cpu"), console)
    assert ("--dtype bf16-mixed" in console.export_text()) == hinted
