"""Per-sample summed answer log-probs, log pi(y|x), from a causal LM.

Token t is predicted by position t-1, so the answer mask is shifted by one against the logits.
Only answer positions need logits: `answer_logps` runs the decoder, picks the hidden states that
predict answer tokens and applies the output head to them in chunks, so memory never holds a
[B, T, V] tensor (for a 152k vocabulary that tensor is the largest thing in the step). In
training each chunk's logits are recomputed in backward instead of kept, and the output head's
weight gradient is accumulated chunk by chunk into one buffer (`_ChunkedHeadLogps`). Where the
decoder layers are compiled (`train --compile`), each chunk's softmax arithmetic is compiled too
(`use_compiled_head`): fused, it passes over the chunk's logits a few times instead of a dozen.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from minorsft.models import autocast_context

# Logit elements per output-head chunk: 2**24 fp32 values are 64 MiB, so a chunk holds about
# 110 positions of a 152k vocabulary (Qwen2) or 340 of a 49k one (SmolLM2). Large enough to keep
# the matmul efficient, small enough that the vocabulary never dominates a step's memory.
LOGITS_CHUNK_ELEMENTS = 1 << 24


def default_chunk_tokens(vocab_size: int) -> int:
    """Positions per output-head chunk so that one chunk's logits stay near 64 MiB in fp32."""
    return max(16, LOGITS_CHUNK_ELEMENTS // max(1, vocab_size))


def pad_batch(
    input_ids: list[list[int]], answer_masks: list[list[bool]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] input_ids, attention_mask and answer_mask tensors."""
    width = max(len(ids) for ids in input_ids)
    ids_out = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    mask_out = torch.zeros((len(input_ids), width), dtype=torch.bool)
    for row, (ids, mask) in enumerate(zip(input_ids, answer_masks, strict=True)):
        ids_out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        mask_out[row, : len(ids)] = torch.tensor(mask, dtype=torch.bool)
    return ids_out.to(device), attention_mask.to(device), mask_out.to(device)


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor
) -> torch.Tensor:
    """Summed log-probs of the answer tokens from full logits: the plain reference formula.

    Args:
        logits: [B, T, V] next-token logits.
        input_ids: [B, T] token ids.
        answer_mask: [B, T] true where the token is an answer token.

    Returns:
        [B] sum over answer tokens t of log p(input_ids[t] | input_ids[<t]).
    """
    labels = input_ids[:, 1:]
    mask = answer_mask[:, 1:]
    token_logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logps = token_logps.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return (token_logps * mask).sum(-1)


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias, labels: torch.Tensor):
    logits = F.linear(hidden, weight, bias).float()  # [N, V]
    return -F.cross_entropy(logits, labels, reduction="none")  # [N]


def _chunk_grad_logits_in_place(hidden, weight, bias, labels, grad):
    """d/dz of sum_i grad_i * log softmax(z_i)[y_i] = grad * (onehot(y) - softmax(z)), [c, V].

    Eager: the softmax is taken in place (max, exp, normalise): logsumexp or a one-hot tensor
    would allocate another [c, V] buffer.
    """
    logits = F.linear(hidden, weight, bias).float()  # [c, V]
    logits.sub_(logits.amax(-1, keepdim=True)).exp_()
    probs = logits.div_(logits.sum(-1, keepdim=True))
    grad_logits = probs.mul_(-grad[:, None])  # -grad * softmax, in place
    grad_logits[torch.arange(labels.shape[0], device=labels.device), labels] += grad
    return grad_logits.to(weight.dtype)


def _chunk_grad_logits_fused(hidden, weight, bias, labels, grad):
    """The same gradient written for torch.compile: one-hot from a comparison, no in-place
    writes, so after the matmul the softmax, the one-hot and the cast to the weight's dtype fuse
    into generated kernels that write only the [c, V] result (eager, this would allocate four
    [c, V] temporaries)."""
    logits = F.linear(hidden, weight, bias).float()  # [c, V]
    onehot = torch.arange(logits.shape[-1], device=labels.device) == labels[:, None]
    return (grad[:, None] * (onehot.to(logits.dtype) - torch.softmax(logits, -1))
            ).to(weight.dtype)


class HeadKernels(NamedTuple):
    """The per-chunk arithmetic of the chunked head, eager or compiled."""

    logps: Callable  # (hidden, weight, bias, labels) -> [c] fp32 log p(label | hidden)
    grad_logits: Callable  # (hidden, weight, bias, labels, grad) -> [c, V] in the weight's dtype


EAGER_HEAD = HeadKernels(_chunk_logps, _chunk_grad_logits_in_place)
# Output heads whose chunks run through the compiled kernels (`use_compiled_head`).
_COMPILED_HEADS: weakref.WeakSet = weakref.WeakSet()


def _rows_dynamic(compiled: Callable) -> Callable:
    """Mark the chunk's row count dynamic: the last chunk of every batch has another size, and
    it should not compile again (the vocabulary and width stay static, which suits the kernels)."""

    @functools.wraps(compiled)
    def call(hidden, weight, bias, labels, *rest):
        for tensor in (hidden, labels, *rest):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return compiled(hidden, weight, bias, labels, *rest)

    return call


@functools.cache
def compiled_head() -> HeadKernels:
    """The chunk kernels through torch.compile (built once per process, compiled at first use)."""
    return HeadKernels(_rows_dynamic(torch.compile(_chunk_logps)),
                       _rows_dynamic(torch.compile(_chunk_grad_logits_fused)))


def use_compiled_head(model) -> None:
    """From now on the model's output head computes its chunks with `compiled_head()`."""
    _COMPILED_HEADS.add(model.get_output_embeddings())


def head_kernels(head: torch.nn.Module) -> HeadKernels:
    return compiled_head() if head in _COMPILED_HEADS else EAGER_HEAD


class _ChunkedHeadLogps(torch.autograd.Function):
    """log p(label | hidden) through a linear head, chunked in forward AND backward.

    Forward keeps only the [N] results. Backward recomputes each chunk's logits and uses
    d log softmax(z)[y] / dz = onehot(y) - softmax(z), so per chunk it holds one [chunk, V] fp32
    buffer, and it adds the head's weight gradient into a single [V, H] buffer in place. (With
    per-chunk autograd checkpoints every chunk returns its own [V, H] gradient and autograd
    sums them, which holds two such tensors at once: 0.5 GiB each for a 152k x 896 head.)
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, kernels):
        out = torch.empty(labels.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, labels.shape[0], chunk_tokens):
            stop = start + chunk_tokens
            out[start:stop] = kernels.logps(hidden[start:stop], weight, bias,
                                            labels[start:stop])
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.chunk_tokens = chunk_tokens
        ctx.kernels = kernels
        # Under autocast (--dtype bf16-mixed) the logits were computed in bf16; backward runs
        # outside autocast, so it re-enters it to recompute the same logits.
        device_type = hidden.device.type
        ctx.autocast = (torch.get_autocast_dtype(device_type)
                        if torch.is_autocast_enabled(device_type) else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with autocast_context(grad_out.device, ctx.autocast):
            return _ChunkedHeadLogps._chunked_backward(ctx, grad_out)

    @staticmethod
    def _chunked_backward(ctx, grad_out):
        hidden, weight, bias, labels = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        for start in range(0, labels.shape[0], ctx.chunk_tokens):
            stop = start + ctx.chunk_tokens
            h = hidden[start:stop]
            grad_logits = ctx.kernels.grad_logits(h, weight, bias, labels[start:stop],
                                                  grad_out[start:stop])  # [c, V]
            if need_hidden:
                grad_hidden[start:stop] = grad_logits @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), h)
            if need_bias:
                grad_bias += grad_logits.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def final_logit_transform(model):
    """Models whose logits are more than `lm_head(hidden)` (softcapping, scaling) need logits."""
    config = model.config
    return bool(getattr(config, "final_logit_softcapping", None)) or bool(
        getattr(config, "logit_scale", None)
    )


def head_logps(
    model,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    sample_index: torch.Tensor,
    num_samples: int,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Per-sample sums of log p(label | hidden) through the model's output head, in chunks.

    Args:
        model: a transformers causal LM (its output embeddings are the head).
        hidden: [N, H] final hidden states of the positions that predict answer tokens.
        labels: [N] the answer token each position predicts.
        sample_index: [N] which sample each position belongs to.
        num_samples: B, the number of samples.
        chunk_tokens: positions per chunk; default from the vocabulary size.

    Returns:
        [B] fp32 sums. No [N, V] tensor ever exists, in forward or in backward.
    """
    token_logps = head_token_logps(model, hidden, labels, chunk_tokens)
    summed = torch.zeros(num_samples, dtype=torch.float32, device=hidden.device)
    return summed.index_add(0, sample_index, token_logps)


def head_token_logps(model, hidden: torch.Tensor, labels: torch.Tensor,
                     chunk_tokens: int | None = None) -> torch.Tensor:
    """Per-position log p(label | hidden) [N] (fp32) through the output head, in chunks."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # e.g. an adapter on lm_head: its weight is not all
        raise ValueError(f"the output head is a {type(head).__name__}, not a plain Linear; "
                         "chunked log-probs need the head's own weight (no adapter on lm_head)")
    chunk_tokens = chunk_tokens or default_chunk_tokens(head.weight.shape[0])
    kernels = head_kernels(head)
    if labels.numel() == 0:
        # hidden.sum(-1) is an empty [0] tensor still tied to the graph, so backward works.
        token_logps = hidden.sum(-1).float()
    elif torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        token_logps = _ChunkedHeadLogps.apply(hidden, head.weight, head.bias, labels,
                                              chunk_tokens, kernels)
    else:
        token_logps = torch.cat([
            kernels.logps(hidden[i:i + chunk_tokens], head.weight, head.bias,
                          labels[i:i + chunk_tokens])
            for i in range(0, labels.numel(), chunk_tokens)])
    return token_logps


def answer_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_mask: torch.Tensor,
    chunk_tokens: int | None = None,
    position_ids: torch.Tensor | None = None,
    return_tokens: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs [B] (fp32) for right-padded batches.

    Args:
        model: a transformers causal LM.
        input_ids: [B, T].
        attention_mask: [B, T], 1 for real tokens.
        answer_mask: [B, T], true for answer tokens (never on the first position).
        chunk_tokens: answer positions sent through the output head at once (default: from
            the vocabulary size, see `default_chunk_tokens`).
        position_ids: optional [B, T] positions.
        return_tokens: return the per-token log-probs [N] of the answer tokens (row-major
            order) and their sample index [N] instead of the sums (for drift checks).
    """
    if final_logit_transform(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids, use_cache=False).logits
        if not return_tokens:
            return sequence_logps(logits, input_ids, answer_mask.bool())
        sample_index, position = answer_mask[:, 1:].bool().nonzero(as_tuple=True)
        token_logps = torch.log_softmax(logits[sample_index, position].float(), dim=-1)
        labels = input_ids[sample_index, position + 1].unsqueeze(-1)
        return token_logps.gather(-1, labels).squeeze(-1), sample_index

    # use_cache=False: a scoring pass has no use for a KV cache (it would only cost memory).
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state  # [B, T, H]
    predicting = answer_mask[:, 1:].bool()  # [B, T-1]: position t-1 predicts answer token t
    sample_index, position = predicting.nonzero(as_tuple=True)  # [N], [N]
    labels = input_ids[sample_index, position + 1]  # [N]
    if return_tokens:
        return head_token_logps(model, hidden[sample_index, position], labels,
                                chunk_tokens), sample_index
    return head_logps(model, hidden[sample_index, position], labels, sample_index,
                      input_ids.shape[0], chunk_tokens)
