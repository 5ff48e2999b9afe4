"""Chunked answer log-probs against the plain full-logits formula, forward and backward."""

import torch

from minorsft.logprobs import answer_logps, pad_batch, sequence_logps

from .conftest import build_tiny_model, build_tiny_tokenizer


def test_answer_logps_matches_full_logits_forward_and_backward():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=1)
    generator = torch.Generator().manual_seed(0)
    lengths = [7, 12, 5]
    ids = [torch.randint(3, len(tokenizer), (n,), generator=generator).tolist() for n in lengths]
    masks = [[False] * 3 + [True] * (n - 3) for n in lengths]
    input_ids, attention_mask, answer_mask = pad_batch(ids, masks, tokenizer.pad_token_id, "cpu")

    chunked = answer_logps(model, input_ids, attention_mask, answer_mask, chunk_tokens=4)
    chunked.sum().backward()
    chunked_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    naive = sequence_logps(logits, input_ids, answer_mask)
    naive.sum().backward()
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-5)
    for got, want in zip(chunked_grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_padding_does_not_change_a_sample():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=2).eval()
    short = [5, 6, 7, 8, 9]
    mask = [False, False, True, True, True]
    alone = answer_logps(model, *pad_batch([short], [mask], 0, "cpu"))
    padded = answer_logps(model, *pad_batch([short, list(range(3, 30))], [mask, [True] * 27],
                                            tokenizer.pad_token_id, "cpu"))
    torch.testing.assert_close(alone[0], padded[0], rtol=1e-5, atol=1e-5)
