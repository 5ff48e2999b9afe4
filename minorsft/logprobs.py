"""Per-sample summed answer log-probs, log pi(y|x), from a causal LM.

Token t is predicted by position t-1, so the answer mask is shifted by one against the logits.
Only answer positions need logits: `answer_logps` runs the decoder, picks the hidden states that
predict answer tokens and applies the output head to them in blocks, so memory never holds a
[B, T, V] tensor (for a 152k vocabulary that tensor is the largest thing in the step).

The blocks cut the vocabulary, not the positions (`head_blocks`): all N answer positions meet
one slice of the head's weight at a time, [N, H] x [H, V_b], and the log-softmax's normaliser is
gathered across slices (an online logsumexp). Cutting positions instead, as the first version
did, reads the whole [V, H] weight again for every chunk of ~110 positions, and rewrites the
whole weight gradient too: for 2,500 answer positions at Qwen2-0.5B's shape (a 272 MB bf16 head)
that is about 31 GB of memory traffic per step, against about 2 GB in vocabulary blocks (an
estimate from the tensor sizes). In training each block's logits are recomputed in backward
instead of kept (`_BlockedHeadLogps`), and each slice of the weight gradient is written once.
Where the decoder layers are compiled (`train --compile`), each block's arithmetic is compiled
too (`use_compiled_head`): fused, it passes over the block's logits a few times instead of a
dozen.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from minorsft.models import autocast_context, to_device

# Logit elements per output-head block: 2**24 fp32 values are 64 MiB. For N answer positions a
# block spans 2**24 / N vocabulary entries (all of a 152k vocabulary up to 110 positions),
# large enough to keep the matmuls efficient, small enough that the vocabulary never dominates
# a step's memory.
LOGITS_CHUNK_ELEMENTS = 1 << 24
# The narrowest vocabulary slice; beyond 2**24 / 1024 = 16,384 answer positions the positions
# are cut into blocks of that many as well.
MIN_VOCAB_BLOCK = 1024
# A slice narrower than the vocabulary is a multiple of this many entries. A bf16 [N, V_b]
# block whose rows are not a multiple of 16 bytes apart cannot use Hopper's TMA matmul kernels:
# cuBLAS falls back to older, slower ones for all three of the block's matmuls.
VOCAB_BLOCK_MULTIPLE = 128
# Round the number of answer positions sent through the head up to a multiple of this (0: off,
# the default): pad rows with a zero hidden state and label 0, whose results are dropped. On
# a GPU minorsft's steps were about 30 ms slower on answer counts not met before in the
# process, which a run of some hundreds of steps meets mostly (docs/performance.md, 7d; which
# part pays is not known). If the head pays per count, a bucket bounds it. Off until a GPU has
# measured it (`benchmarks/gpu_head_counts.py`, `gpu_long_run.py`).
POSITION_BUCKET = 0


def head_blocks(num_positions: int, vocab_size: int,
                elements: int | None = None) -> tuple[int, int]:
    """(positions, vocabulary entries) per block: about `elements` logits (default 2**24)."""
    elements = elements or LOGITS_CHUNK_ELEMENTS
    vocab_block = max(MIN_VOCAB_BLOCK, elements // max(1, num_positions))
    if vocab_block < vocab_size:
        vocab_block = max(VOCAB_BLOCK_MULTIPLE, vocab_block - vocab_block % VOCAB_BLOCK_MULTIPLE)
    vocab_block = min(vocab_size, vocab_block)
    return max(1, elements // vocab_block), vocab_block


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
    return (to_device(ids_out, device), to_device(attention_mask, device),
            to_device(mask_out, device))


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


def _block_logps(hidden, weight, bias, local_labels, lse, picked):
    """One vocabulary slice's part of log p(label | hidden): returns the running logsumexp [n]
    and label logit [n] (fp32) with this slice included. `local_labels` are the labels minus the
    slice's first id (out of [0, V_b) where the label lies in another slice)."""
    logits = F.linear(hidden, weight, bias).float()  # [n, V_b]
    inside = (local_labels >= 0) & (local_labels < logits.shape[-1])
    label_logit = logits.gather(-1, local_labels.clamp(0, logits.shape[-1] - 1)[:, None])
    return (torch.logaddexp(lse, torch.logsumexp(logits, -1)),
            torch.where(inside, label_logit[:, 0], picked))


def _block_grad_logits_in_place(hidden, weight, bias, local_labels, lse, grad):
    """d/dz of sum_i grad_i * (z_i[y_i] - lse_i) on one slice: grad * (onehot(y) - softmax(z)),
    [n, V_b] in the weight's dtype, the softmax taken with the full row's logsumexp.

    Eager: computed in place (subtract, exp, scale), a one-hot tensor would be another [n, V_b]
    buffer; rows whose label lies in another slice add 0 at a clamped column.
    """
    logits = F.linear(hidden, weight, bias).float()  # [n, V_b]
    grad_logits = logits.sub_(lse[:, None]).exp_().mul_(-grad[:, None])  # -grad * softmax
    inside = (local_labels >= 0) & (local_labels < logits.shape[-1])
    columns = local_labels.clamp(0, logits.shape[-1] - 1)[:, None]
    grad_logits.scatter_add_(-1, columns, torch.where(inside, grad, 0.0)[:, None])
    return grad_logits.to(weight.dtype)


def _block_grad_logits_fused(hidden, weight, bias, local_labels, lse, grad):
    """The same gradient written for torch.compile: one-hot from a comparison, no in-place
    writes, so after the matmul the softmax, the one-hot and the cast to the weight's dtype fuse
    into one generated kernel that writes only the [n, V_b] result (eager, this would allocate
    four [n, V_b] temporaries)."""
    logits = F.linear(hidden, weight, bias).float()  # [n, V_b]
    onehot = torch.arange(logits.shape[-1], device=local_labels.device) == local_labels[:, None]
    return (grad[:, None] * (onehot.to(logits.dtype) - torch.exp(logits - lse[:, None]))
            ).to(weight.dtype)


class HeadKernels(NamedTuple):
    """The per-block arithmetic of the blocked head, eager or compiled."""

    logps: Callable  # (hidden, weight, bias, local_labels, lse, picked) -> (lse, picked)
    grad_logits: Callable  # (hidden, weight, bias, local_labels, lse, grad) -> [n, V_b]


EAGER_HEAD = HeadKernels(_block_logps, _block_grad_logits_in_place)
# Output heads whose blocks run through the compiled kernels (`use_compiled_head`).
_COMPILED_HEADS: weakref.WeakSet = weakref.WeakSet()


def _sizes_dynamic(compiled: Callable) -> Callable:
    """Mark the block's position count and vocabulary width dynamic: the last slice of the
    vocabulary and every batch's answer count differ, and they should not compile again (the
    hidden width stays static)."""

    @functools.wraps(compiled)
    def call(hidden, weight, bias, local_labels, *rest):
        for tensor in (hidden, local_labels, *rest):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        for tensor in (weight, bias):
            if tensor is not None:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return compiled(hidden, weight, bias, local_labels, *rest)

    return call


@functools.cache
def compiled_head() -> HeadKernels:
    """The block kernels through torch.compile (built once per process, compiled at first use)."""
    return HeadKernels(_sizes_dynamic(torch.compile(_block_logps)),
                       _sizes_dynamic(torch.compile(_block_grad_logits_fused)))


def use_compiled_head(model) -> None:
    """From now on the model's output head computes its blocks with `compiled_head()`."""
    _COMPILED_HEADS.add(model.get_output_embeddings())


def head_kernels(head: torch.nn.Module) -> HeadKernels:
    return compiled_head() if head in _COMPILED_HEADS else EAGER_HEAD


def _slices(size: int, step: int):
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def _bias_slice(bias, start, stop):
    return None if bias is None else bias[start:stop]


def _blocked_logps(hidden, weight, bias, labels, blocks, kernels):
    """log p(label | hidden) [N] and the rows' logsumexp [N], fp32, block by block."""
    token_logps = torch.empty(labels.shape[0], dtype=torch.float32, device=hidden.device)
    lse_all = torch.empty_like(token_logps)
    positions, vocab = blocks
    for t0, t1 in _slices(labels.shape[0], positions):
        h, y = hidden[t0:t1], labels[t0:t1]
        lse = torch.full((t1 - t0,), -torch.inf, dtype=torch.float32, device=hidden.device)
        picked = torch.zeros_like(lse)
        for v0, v1 in _slices(weight.shape[0], vocab):
            lse, picked = kernels.logps(h, weight[v0:v1], _bias_slice(bias, v0, v1), y - v0,
                                        lse, picked)
        token_logps[t0:t1] = picked - lse
        lse_all[t0:t1] = lse
    return token_logps, lse_all


class _BlockedHeadLogps(torch.autograd.Function):
    """log p(label | hidden) through a linear head, in blocks in forward AND backward.

    Forward keeps only the [N] results and the rows' logsumexp. Backward recomputes each block's
    logits and uses d log softmax(z)[y] / dz = onehot(y) - softmax(z), so per block it holds one
    [n, V_b] fp32 buffer. Each slice of the weight gradient is written once (once per position
    block, which is one block up to 16k answer positions); the hidden states' gradient is
    summed over the slices in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, blocks, kernels):
        token_logps, lse = _blocked_logps(hidden, weight, bias, labels, blocks, kernels)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.blocks, ctx.kernels = blocks, kernels
        # Under autocast (--dtype bf16-mixed) the logits were computed in bf16; backward runs
        # outside autocast, so it re-enters it to recompute the same logits.
        device_type = hidden.device.type
        ctx.autocast = (torch.get_autocast_dtype(device_type)
                        if torch.is_autocast_enabled(device_type) else None)
        return token_logps

    @staticmethod
    def backward(ctx, grad_out):
        with autocast_context(grad_out.device, ctx.autocast):
            return _BlockedHeadLogps._blocked_backward(ctx, grad_out)

    @staticmethod
    def _blocked_backward(ctx, grad_out):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32,
                                  device=hidden.device) if need_hidden else None
        # written slice by slice by the first position block (beta=0 ignores its contents)
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        positions, vocab = ctx.blocks
        for t0, t1 in _slices(labels.shape[0], positions):
            h, y, g, row_lse = hidden[t0:t1], labels[t0:t1], grad_out[t0:t1], lse[t0:t1]
            for v0, v1 in _slices(weight.shape[0], vocab):
                w = weight[v0:v1]
                grad_logits = ctx.kernels.grad_logits(h, w, _bias_slice(bias, v0, v1), y - v0,
                                                      row_lse, g)  # [n, V_b]
                if need_hidden:
                    grad_hidden[t0:t1] += grad_logits @ w
                if need_weight:
                    grad_weight[v0:v1].addmm_(grad_logits.t(), h, beta=0 if t0 == 0 else 1)
                if need_bias:
                    grad_bias[v0:v1] += grad_logits.sum(0)
        if need_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


# Config fields of models whose forward changes the logits after the output head: Gemma 2/3
# softcap them, Cohere scales them, Granite divides them.
LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
HEAD_PROBE_TOKENS = 8
_PLAIN_HEAD_ATTRIBUTE = "_minorsft_plain_head"


def final_logit_transform(model) -> bool:
    """Whether the model's logits are more than `lm_head(last hidden state)`: then the log-probs
    must come from the model's own logits (full [T, V], no blocks), or they would be wrong.

    Known config fields answer at once. Any other model is probed once (the answer is kept on
    the model): its output head on its decoder's hidden states must give its forward's logits,
    on a few tokens. That catches what no field names (a scaled hidden state before the head,
    a multiplier on it, a vocabulary cut after it) as long as it changes the logits.
    """
    config = model.config
    if any(getattr(config, field, None) not in (None, 0, 1, 1.0)
           for field in LOGIT_TRANSFORM_FIELDS):
        return True
    plain = getattr(model, _PLAIN_HEAD_ATTRIBUTE, None)
    if plain is None:
        plain = _head_gives_the_logits(model)
        setattr(model, _PLAIN_HEAD_ATTRIBUTE, plain)
    return not plain


@torch.no_grad()
def _head_gives_the_logits(model) -> bool:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        return False
    vocab = head.weight.shape[0]
    ids = ((torch.arange(HEAD_PROBE_TOKENS) * 7919 + 11) % vocab)[None].to(head.weight.device)
    training = model.training
    model.eval()  # the two passes must not differ by dropout
    try:
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        ours = head(hidden).float()
        theirs = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        model.train(training)
    if ours.shape != theirs.shape:
        return False
    # The same matmul on the same numbers: any transform shows far above this tolerance
    return bool(torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * (1 + theirs.abs().max())))


def head_logps(
    model,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    sample_index: torch.Tensor,
    num_samples: int,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Per-sample sums of log p(label | hidden) through the model's output head, in blocks.

    Args:
        model: a transformers causal LM (its output embeddings are the head).
        hidden: [N, H] final hidden states of the positions that predict answer tokens.
        labels: [N] the answer token each position predicts.
        sample_index: [N] which sample each position belongs to.
        num_samples: B, the number of samples.
        blocks: (positions, vocabulary entries) per block; default `head_blocks`.

    Returns:
        [B] fp32 sums. No [N, V] tensor ever exists, in forward or in backward.
    """
    token_logps = head_token_logps(model, hidden, labels, blocks)
    summed = torch.zeros(num_samples, dtype=torch.float32, device=hidden.device)
    return summed.index_add(0, sample_index, token_logps)


def head_token_logps(model, hidden: torch.Tensor, labels: torch.Tensor,
                     blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-position log p(label | hidden) [N] (fp32) through the output head, in blocks."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # e.g. an adapter on lm_head: its weight is not all
        raise ValueError(f"the output head is a {type(head).__name__}, not a plain Linear; "
                         "blocked log-probs need the head's own weight (no adapter on lm_head)")
    if labels.numel() == 0:
        # hidden.sum(-1) is an empty [0] tensor still tied to the graph, so backward works.
        return hidden.sum(-1).float()
    count = labels.numel()
    if POSITION_BUCKET and count % POSITION_BUCKET:
        pad = POSITION_BUCKET - count % POSITION_BUCKET
        hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[-1])])
        labels = torch.cat([labels, labels.new_zeros(pad)])
        return head_token_logps(model, hidden, labels, blocks)[:count]
    blocks = blocks or head_blocks(count, head.weight.shape[0])
    kernels = head_kernels(head)
    if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        return _BlockedHeadLogps.apply(hidden, head.weight, head.bias, labels, blocks, kernels)
    return _blocked_logps(hidden, head.weight, head.bias, labels, blocks, kernels)[0]


def answer_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_mask: torch.Tensor,
    blocks: tuple[int, int] | None = None,
    position_ids: torch.Tensor | None = None,
    return_tokens: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs [B] (fp32) for right-padded batches.

    Args:
        model: a transformers causal LM.
        input_ids: [B, T].
        attention_mask: [B, T], 1 for real tokens.
        answer_mask: [B, T], true for answer tokens (never on the first position).
        blocks: (answer positions, vocabulary entries) sent through the output head at once
            (default: `head_blocks`).
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
                                blocks), sample_index
    return head_logps(model, hidden[sample_index, position], labels, sample_index,
                      input_ids.shape[0], blocks)
