"""Blocked-head and packed log-probs equal the naive full-logits formula, forward and backward.

The naive reference is `sequence_logps(model(...).logits, ...)`: log-softmax over the whole
[B, T, V] logits, gather, mask, sum. Every memory-saving path must give the same per-sample
sums and the same parameter gradients (to float tolerance), or it would change the loss.
"""

from __future__ import annotations

import pytest
import torch

from minorsft.logprobs import answer_logps, head_blocks, pad_batch, sequence_logps
from minorsft.packing import check_packing_support, micro_batch_logps, pack_batch

from .conftest import build_tiny_model, build_tiny_tokenizer

# Samples of different lengths; answers are the masked tails, the second has two answer spans
# (a multi-turn chat), the third a one-token answer.
SAMPLES = [
    ([5, 17, 30, 41, 8, 9, 12, 60, 61, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
    ([5, 22, 2, 70, 71, 2, 33, 34, 80, 81, 82, 2, 90], [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0]),
    ([5, 11, 12, 13, 2], [0, 0, 0, 0, 1]),
    ([5, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 2, 3, 4],
     [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _batch():
    ids = [s[0] for s in SAMPLES]
    masks = [[bool(v) for v in s[1]] for s in SAMPLES]
    return ids, masks


def _naive(model):
    ids, masks = _batch()
    input_ids, attention_mask, answer_mask = pad_batch(ids, masks, 0, torch.device("cpu"))
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return sequence_logps(logits, input_ids, answer_mask)


def _grads(model, logps):
    model.zero_grad(set_to_none=True)
    # Unequal weights per sample so that a mix-up between samples shows in the gradient.
    (logps * torch.tensor([1.0, -0.5, 2.0, 0.25])).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


def _single(model, ids, mask):
    input_ids, attention_mask, answer_mask = pad_batch([ids], [mask], 0, torch.device("cpu"))
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return sequence_logps(logits, input_ids, answer_mask)[0]


def test_naive_matches_a_hand_sum(model):
    """The reference itself: sum over answer tokens t of log softmax(logits[t-1])[y_t]."""
    ids, mask = SAMPLES[2][0], [bool(v) for v in SAMPLES[2][1]]
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    want = torch.log_softmax(logits[3], -1)[ids[4]]  # the only answer token is at position 4
    torch.testing.assert_close(_single(model, ids, mask), want)


# (positions, vocabulary entries) per block of the 400-entry head: one position per block (the
# weight gradient summed over position blocks), both cut with a 1-wide last vocabulary slice
# (400 = 57 x 7 + 1), vocabulary slices only, and the default (one block here).
@pytest.mark.parametrize("blocks", [(1, 400), (3, 7), (100, 64), None])
def test_blocked_equals_naive_forward_and_backward(model, blocks):
    want = _naive(model)
    want_grads = _grads(model, want)
    ids, masks = _batch()
    tensors = pad_batch(ids, masks, 0, torch.device("cpu"))
    got = answer_logps(model, *tensors, blocks=blocks)
    torch.testing.assert_close(got, want.detach(), **TOL)
    _assert_same_grads(_grads(model, got), want_grads)


@pytest.mark.parametrize("bucket", [8, 64])
def test_answer_positions_in_buckets_change_nothing(model, monkeypatch, bucket):
    """POSITION_BUCKET pads the head's positions (zero hidden state, label 0) and drops their
    results: the same sums and gradients, also under inference mode (scoring)."""
    import minorsft.logprobs as logprobs

    want = _naive(model)
    want_grads = _grads(model, want)
    ids, masks = _batch()
    tensors = pad_batch(ids, masks, 0, torch.device("cpu"))
    calls = []
    real = logprobs._blocked_logps
    monkeypatch.setattr(logprobs, "_blocked_logps",
                        lambda hidden, *rest: calls.append(len(hidden)) or real(hidden, *rest))
    monkeypatch.setattr(logprobs, "POSITION_BUCKET", bucket)
    got = answer_logps(model, *tensors, blocks=(3, 7))
    torch.testing.assert_close(got, want.detach(), **TOL)
    _assert_same_grads(_grads(model, got), want_grads)
    assert calls and all(count % bucket == 0 for count in calls)  # the head saw padded counts
    with torch.inference_mode():
        torch.testing.assert_close(answer_logps(model, *tensors), want.detach(), **TOL)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_equals_unpacked_forward_and_backward(model, attention):
    """One packed row gives each sample's own log-prob: attention is isolated per sample."""
    model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    check_packing_support(model)
    want = _naive(model)
    want_grads = _grads(model, want)
    rows = [{"input_ids": s[0], "answer_mask": [bool(v) for v in s[1]]} for s in SAMPLES]
    got, tokens = micro_batch_logps(model, rows, 0, torch.device("cpu"), packing=True)
    assert tokens == sum(len(s[0]) for s in SAMPLES)
    torch.testing.assert_close(got, want.detach(), **TOL)
    _assert_same_grads(_grads(model, got), want_grads)
    # And each value equals the sample scored entirely alone (no batch at all).
    for value, (ids, mask) in zip(got.detach(), SAMPLES, strict=True):
        torch.testing.assert_close(value, _single(model, ids, [bool(v) for v in mask]).detach(),
                                   **TOL)


def test_packing_without_isolation_would_differ(model):
    """The test above can fail: plain concatenation (one long causal sequence) changes values."""
    ids, masks = _batch()
    packed = pack_batch(ids, masks, torch.device("cpu"))
    hidden = model.get_decoder()(input_ids=packed.input_ids, use_cache=False).last_hidden_state[0]
    logits = model.get_output_embeddings()(hidden[packed.positions])
    labels = packed.input_ids[0, packed.positions + 1]
    leaked = torch.zeros(4).index_add(
        0, packed.sample_index, torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0])
    assert not torch.allclose(leaked[1:], _naive(model)[1:].detach(), atol=1e-3)


def test_pack_batch_never_predicts_across_samples():
    packed = pack_batch([[1, 2, 3], [4, 5]], [[False, True, True], [True, True]],
                        torch.device("cpu"))
    # Sample 2's first token is marked as answer but has no preceding position of its own.
    assert packed.positions.tolist() == [0, 1, 3]
    assert packed.sample_index.tolist() == [0, 0, 1]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1]]


def test_pack_batch_edge_samples():
    """A one-token sample and one without answer tokens predict nothing; a mismatch is named."""
    packed = pack_batch([[7], [1, 2, 3], [4, 5]], [[True], [False] * 3, [False, True]],
                        torch.device("cpu"))
    assert packed.input_ids.tolist() == [[7, 1, 2, 3, 4, 5]]
    assert packed.position_ids.tolist() == [[0, 0, 1, 2, 0, 1]]
    assert packed.positions.tolist() == [4] and packed.sample_index.tolist() == [2]
    assert packed.lengths == [1, 3, 2] and packed.num_tokens == 6
    with pytest.raises(ValueError, match="sample 1: 2 token ids but 3 answer-mask entries"):
        pack_batch([[1, 2], [3, 4]], [[False, True], [False, True, True]], torch.device("cpu"))


def test_no_answer_tokens_gives_zero_and_backward_works(model):
    input_ids, attention_mask, answer_mask = pad_batch([[5, 6, 7]], [[False] * 3], 0,
                                                       torch.device("cpu"))
    got = answer_logps(model, input_ids, attention_mask, answer_mask)
    assert got.tolist() == [0.0]
    got.sum().backward()  # no NaN, no error


def test_inference_mode_scoring_matches(model):
    model.eval()
    want = _naive(model).detach()
    ids, masks = _batch()
    with torch.inference_mode():
        got = answer_logps(model, *pad_batch(ids, masks, 0, torch.device("cpu")))
    torch.testing.assert_close(got, want, **TOL)


def test_default_blocks_keep_logits_small():
    for positions in (1, 110, 3000, 16_384, 50_000):
        position_block, vocab_block = head_blocks(positions, 151_936)
        assert position_block * vocab_block * 4 <= 64 * 2**20  # 64 MiB of fp32 logits
        assert vocab_block <= 151_936
        assert vocab_block == 151_936 or vocab_block % 128 == 0  # aligned rows for the matmuls
        assert position_block >= min(positions, 16_384)
    assert head_blocks(3000, 151_936) == (3048, 5504)  # all positions meet a 5,504-wide slice
    assert head_blocks(111, 151_936) == (111, 151_040)  # 151,146 rounded down to 128s
    assert head_blocks(100, 151_936)[1] == 151_936  # few positions: the whole vocabulary
    assert head_blocks(50_000, 151_936) == (16_384, 1024)  # many: positions cut as well
    assert head_blocks(5, 10) == ((1 << 24) // 10, 10)


@pytest.mark.parametrize("variant", ["tied", "bias"])
def test_chunked_head_variants(model, variant):
    """Tied input/output embeddings (SmolLM2) and a head with a bias: same values and grads."""
    if variant == "tied":
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        torch.manual_seed(0)
        head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features)
        model.lm_head = head
    want = _naive(model)
    want_grads = _grads(model, want)
    ids, masks = _batch()
    got = answer_logps(model, *pad_batch(ids, masks, 0, torch.device("cpu")), blocks=(5, 9))
    torch.testing.assert_close(got, want.detach(), **TOL)
    _assert_same_grads(_grads(model, got), want_grads)


def test_padding_does_not_change_a_sample():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=2).eval()
    short = [5, 6, 7, 8, 9]
    mask = [False, False, True, True, True]
    alone = answer_logps(model, *pad_batch([short], [mask], 0, "cpu"))
    padded = answer_logps(model, *pad_batch([short, list(range(3, 30))], [mask, [True] * 27],
                                            tokenizer.pad_token_id, "cpu"))
    torch.testing.assert_close(alone[0], padded[0], rtol=1e-5, atol=1e-5)


def _transformed_models():
    """Models whose forward changes the logits after the output head: one that a config field
    names (Granite divides by `logits_scaling`) and one that nothing names (found by probing)."""
    from transformers import GraniteConfig, GraniteForCausalLM, LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    granite = GraniteForCausalLM(GraniteConfig(**sizes, logits_scaling=16.0))
    plain = build_tiny_model(build_tiny_tokenizer())
    scaled = ScaledLlama(plain.config)
    scaled.load_state_dict(plain.state_dict())
    return {"granite": granite, "unnamed scaling": scaled}


@pytest.mark.parametrize("name", ["granite", "unnamed scaling"])
@pytest.mark.parametrize("packing", [False, True])
def test_models_that_transform_their_logits_get_their_own_log_probs(name, packing):
    """The blocked head computes log_softmax(lm_head(h)); for these models that is wrong (a tiny
    Granite gave -148.5 where its own logits give -30.6), so their logits are used."""
    model = _transformed_models()[name].float()
    ids, masks = _batch()
    rows = [{"input_ids": i, "answer_mask": m} for i, m in zip(ids, masks, strict=True)]
    got, _ = micro_batch_logps(model, rows, 0, torch.device("cpu"), packing)
    torch.testing.assert_close(got, _naive(model).detach(), **TOL)


def test_a_plain_head_is_probed_once_and_keeps_the_blocks(model, monkeypatch):
    from minorsft import logprobs

    assert not logprobs.final_logit_transform(model)
    monkeypatch.setattr(logprobs, "_head_gives_the_logits", lambda m: pytest.fail("probed twice"))
    assert not logprobs.final_logit_transform(model)


def test_the_head_probe_is_not_fooled_by_dropout_and_keeps_the_mode():
    """A model in training mode with dropout gives two different passes; probed in eval mode it
    is still found plain (keeping the blocks), and it is left in training mode."""
    from transformers import LlamaForCausalLM

    from minorsft.logprobs import final_logit_transform

    plain = build_tiny_model(build_tiny_tokenizer())
    model = LlamaForCausalLM(plain.config.__class__(**{**plain.config.to_dict(),
                                                       "attention_dropout": 0.5}))
    model.train()
    assert not final_logit_transform(model)
    assert model.training
