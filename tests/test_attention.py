"""Per-sample SDPA for packed rows: same values and gradients as padding, and a check that bites.

`minorsft.attention` replaces transformers' dense block-diagonal mask with one SDPA call per
packed sample. The references here are the padded batch under plain SDPA and each sample run
alone; the isolation check must fail on an attention that lets samples see each other.
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import minorsft.attention
from minorsft.attention import (
    LAYOUTS,
    SEGMENT_ATTENTION,
    check_packed_isolation,
    layout_note,
    lengths_from_positions,
    packed_forward_kwargs,
    packed_sample_lengths,
    use_segment_attention,
    without_packed_row_detection,
)
from minorsft.logprobs import answer_logps, final_logit_transform, pad_batch
from minorsft.packing import micro_batch_logps, prepare_packing

from .conftest import build_tiny_model
from .test_logprobs import SAMPLES, TOL, _assert_same_grads, _grads, _naive

CPU = torch.device("cpu")


def _rows():
    return [{"input_ids": ids, "answer_mask": [bool(v) for v in mask]} for ids, mask in SAMPLES]


def _reference_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                      window_size=(-1, -1), enable_gqa=False):
    """PyTorch's varlen flash kernel (CUDA only) as plain SDPA per sample: [L, heads, D] layout.

    Like torch 2.13's, it refuses fewer key/value heads than query heads without enable_gqa."""
    bounds = cu_seq_q.tolist()
    spans = list(itertools.pairwise(bounds))
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
    assert max_q == max_k == max(b - a for a, b in spans)
    assert window_size == (-1, 0)  # causal
    if k.shape[1] != q.shape[1] and not enable_gqa:
        raise ValueError("grouped-query heads: try setting enable_gqa=True")
    _reference_varlen.calls += 1
    outputs = [torch.nn.functional.scaled_dot_product_attention(
        *(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True, scale=scale,
        enable_gqa=True).transpose(0, 1) for a, b in spans]
    return torch.cat(outputs)


@pytest.fixture(params=LAYOUTS)
def layout(request, monkeypatch):
    """Run the test with packed rows cut apart per sample, gathered into a padded batch, and
    through the varlen layout (its CUDA kernel replaced by a reference: the plumbing is tested
    here, the kernel by benchmarks/gpu_check.py on a GPU)."""
    monkeypatch.setitem(minorsft.attention.LAYOUT_BY_DEVICE, "cpu", request.param)
    if request.param == "varlen":
        monkeypatch.setattr(minorsft.attention, "varlen_attn", _reference_varlen)
        monkeypatch.setattr(minorsft.attention, "varlen_supported", lambda query: True)
    _reference_varlen.calls = 0
    return request.param


def test_lengths_from_positions_reads_the_restarts():
    assert lengths_from_positions(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])) == [3, 2, 4]
    assert lengths_from_positions(torch.tensor([[0, 1, 2, 3]])) is None  # one sample
    assert lengths_from_positions(torch.tensor([[5, 6, 7]])) is None  # a continued sequence
    assert lengths_from_positions(None) is None
    with pytest.raises(ValueError, match="one per batch"):
        lengths_from_positions(torch.tensor([[0, 1, 0], [0, 1, 2]]))


def test_segment_attention_equals_padding_forward_and_backward(model, layout, monkeypatch):
    want = _naive(model)  # plain SDPA, padded batch, full logits
    want_grads = _grads(model, want)
    assert use_segment_attention(model)
    assert model.config._attn_implementation == SEGMENT_ATTENTION
    final_logit_transform(model)  # its one-off probe runs at start-up (train, engine), not here
    eager = minorsft.attention._segment_attention_eager
    eager_calls = []
    monkeypatch.setattr(minorsft.attention, "_segment_attention_eager",
                        lambda *args, **kwargs: eager_calls.append(1) or eager(*args, **kwargs))
    got, tokens = micro_batch_logps(model, _rows(), 0, CPU, packing=True)
    assert tokens == sum(len(ids) for ids, _ in SAMPLES)
    torch.testing.assert_close(got, want.detach(), **TOL)
    # The varlen layout: one kernel call per layer on the bounds passed down from packing, none
    # through the eager (uncompilable) path; the other layouts take the eager path.
    layers = model.config.num_hidden_layers
    assert _reference_varlen.calls == (layers if layout == "varlen" else 0)
    assert len(eager_calls) == (0 if layout == "varlen" else layers)
    _assert_same_grads(_grads(model, got), want_grads)



def test_packed_rows_skip_transformers_packed_detection_only_where_unused(model, monkeypatch):
    """transformers asks the device whether a row's position ids restart (a sync in every
    forward pass); under the segment attention the boundaries come from minorsft and the answer
    goes unused, under transformers' SDPA its packed mask needs it."""
    from transformers import masking_utils

    detect = masking_utils.find_packed_sequence_indices
    asked = []
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices",
                        lambda position_ids: asked.append(1) or detect(position_ids))
    final_logit_transform(model)
    want, _ = micro_batch_logps(model, _rows(), 0, CPU, packing=True)  # transformers' sdpa
    asked_under_sdpa = len(asked)
    assert asked_under_sdpa > 0
    assert use_segment_attention(model)
    got, _ = micro_batch_logps(model, _rows(), 0, CPU, packing=True)
    assert len(asked) == asked_under_sdpa  # not asked again
    torch.testing.assert_close(got, want, **TOL)
    packed_positions = torch.tensor([[0, 1, 2, 0, 1]])

    def still_detects() -> bool:  # outside the packed forward, as before
        before = len(asked)
        found = masking_utils.find_packed_sequence_indices(packed_positions)
        return found is not None and found.tolist() == [[0, 0, 0, 1, 1]] and len(asked) > before

    assert still_detects()

    def failing_forward(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model.get_decoder(), "forward", failing_forward)
    with pytest.raises(RuntimeError, match="out of memory"):
        micro_batch_logps(model, _rows(), 0, CPU, packing=True)
    assert still_detects()  # after an error too
    # another thread never sees the switch of this one
    results = []
    with without_packed_row_detection(SEGMENT_ATTENTION):
        assert masking_utils.find_packed_sequence_indices(packed_positions) is None
        worker = threading.Thread(target=lambda: results.append(still_detects()))
        worker.start()
        worker.join()
    assert results == [True]


@pytest.mark.parametrize("attention", [SEGMENT_ATTENTION, "flash_attention_2"])
def test_masks_skipping_detection_ignore_the_packed_mask(attention):
    """Skipping the detection is safe only while these mask functions return no mask for a row
    without a padding mask, whatever packed mask they are given: a later transformers that used
    it would make the skip wrong, and fail here."""
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        and_masks,
        causal_mask_function,
        packed_sequence_mask_function,
    )

    minorsft.attention._register()  # what use_segment_attention does first
    packed = packed_sequence_mask_function(torch.tensor([[0, 0, 0, 1, 1]]))
    mask = ALL_MASK_ATTENTION_FUNCTIONS[attention](
        batch_size=1, q_length=5, kv_length=5, q_offset=0, kv_offset=0,
        mask_function=and_masks(causal_mask_function, packed), attention_mask=None,
        allow_is_causal_skip=False, dtype=torch.float32, config=None)
    assert mask is None


def test_varlen_runs_under_bf16_autocast_on_bf16_inputs(model, monkeypatch):
    """Under autocast (--dtype bf16-mixed) the rotary embedding hands attention fp32 queries and
    keys beside a bf16 value: cast to the autocast dtype, as SDPA's autocast would, they take the
    varlen kernel (it took the eager per-sample path in every layer)."""
    monkeypatch.setitem(minorsft.attention.LAYOUT_BY_DEVICE, "cpu", "varlen")
    monkeypatch.setattr(minorsft.attention, "varlen_supported",
                        lambda query: query.dtype in (torch.bfloat16, torch.float16))
    dtypes = []

    def recording_varlen(q, k, v, *args, **kwargs):
        dtypes.append({q.dtype, k.dtype, v.dtype})
        return _reference_varlen(q, k, v, *args, **kwargs)

    monkeypatch.setattr(minorsft.attention, "varlen_attn", recording_varlen)
    _reference_varlen.calls = 0
    use_segment_attention(model)
    final_logit_transform(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = micro_batch_logps(model, _rows(), 0, CPU, packing=True)
    assert dtypes == [{torch.bfloat16}] * model.config.num_hidden_layers
    assert torch.isfinite(got).all()

def test_segment_attention_runs_padded_batches_as_plain_sdpa(model):
    """A padded batch (2D mask) under the segment implementation is transformers' SDPA."""
    rows = _rows()
    tensors = pad_batch([r["input_ids"] for r in rows], [r["answer_mask"] for r in rows], 0, CPU)
    want = answer_logps(model, *tensors).detach()
    use_segment_attention(model)
    torch.testing.assert_close(answer_logps(model, *tensors).detach(), want, **TOL)


def test_segment_attention_under_gradient_checkpointing(model, layout, monkeypatch):
    """Recomputed layers in backward see the same position ids, so they cut the same samples,
    and take the lengths kept on them: read from the position ids, each layer would wait for
    the device on a GPU."""
    import minorsft.attention
    from minorsft.train import enable_activation_checkpointing

    want_grads = _grads(model, _naive(model))
    use_segment_attention(model)
    enable_activation_checkpointing(model)
    final_logit_transform(model)  # its one-off probe runs one unpacked sample: not counted
    reads = []
    real = minorsft.attention.lengths_from_positions
    monkeypatch.setattr(minorsft.attention, "lengths_from_positions",
                        lambda position_ids: reads.append(1) or real(position_ids))
    got, _ = micro_batch_logps(model, _rows(), 0, CPU, packing=True)
    _assert_same_grads(_grads(model, got), want_grads)
    assert reads == []


def _leaky(module, query, key, value, attention_mask, **kwargs):
    """One causal attention over the whole row: packed samples see each other."""
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def test_isolation_check_passes_and_catches_a_leak(model, layout):
    assert check_packed_isolation(model) < 1e-3  # transformers' block mask
    use_segment_attention(model)
    assert check_packed_isolation(model) < 1e-3
    AttentionInterface.register("leaky_for_test", _leaky)
    model.set_attn_implementation("leaky_for_test")
    with pytest.raises(ValueError, match="does not isolate packed samples"):
        check_packed_isolation(model)


def test_prepare_packing_defaults(model, tiny_tokenizer):
    assert prepare_packing(model, False) == (False, "padded micro-batches (--no-packing)")
    assert model.config._attn_implementation == "sdpa"  # untouched when not packing
    packing, note = prepare_packing(model, None)
    assert packing and note == "packed micro-batches, no padding (per-sample SDPA attention)"
    assert model.config._attn_implementation == SEGMENT_ATTENTION
    assert "varlen flash attention in bf16/fp16" in layout_note(torch.device("cuda"))
    eager = build_tiny_model(tiny_tokenizer, seed=3)
    eager.set_attn_implementation("eager")
    assert prepare_packing(eager, None)[0] is False  # dense mask: padding is faster
    assert prepare_packing(eager, True)[0] is True  # asked for: correct, only slower


def test_prepare_packing_falls_back_or_refuses_when_the_check_fails(model, monkeypatch):
    def failing_check(model):
        raise ValueError("packing check failed (simulated)")

    monkeypatch.setattr("minorsft.packing.check_packed_isolation", failing_check)
    with pytest.raises(ValueError, match="simulated"):
        prepare_packing(model, True)  # asked for: an error, not a silent fallback
    model.set_attn_implementation("sdpa")
    packing, note = prepare_packing(model, None)
    assert not packing and "simulated" in note
    assert model.config._attn_implementation == "sdpa"  # the per-sample attention was undone


def test_given_lengths_must_cover_the_row(model, layout):
    use_segment_attention(model)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with pytest.raises(ValueError, match="sum to 4, the row has 5 tokens"), \
            packed_sample_lengths([2, 2]):
        model.get_decoder()(input_ids=ids, position_ids=torch.tensor([[0, 1, 0, 1, 2]]),
                            attention_mask=None, use_cache=False)


def test_flash_attn_models_get_the_packed_bounds_instead_of_reading_positions():
    """transformers' flash-attn path reads the sample bounds from the position ids in every layer
    (a device sync each) unless the forward pass hands them down."""
    bounds = packed_forward_kwargs([3, 5, 2], CPU, "flash_attention_2")
    assert bounds["cu_seq_lens_q"].tolist() == [0, 3, 8, 10]
    assert bounds["cu_seq_lens_q"].dtype == torch.int32 and bounds["max_length_q"] == 5
    assert packed_forward_kwargs([3, 5], CPU, "sdpa") == {}
    assert packed_forward_kwargs([3, 5], CPU, SEGMENT_ATTENTION) == {}  # per-sample on the CPU
