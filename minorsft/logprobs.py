"""Per-sample summed answer log-probs, log pi(y|x), from a causal LM.

Token t is predicted by position t-1, so the answer mask is shifted by one against the logits.
Only answer positions need logits: `answer_logps` runs the decoder, picks the hidden states that
predict answer tokens and applies the output head to them in chunks, so memory never holds a
[B, T, V] tensor (for a 152k vocabulary that tensor is the largest thing in the step). In
training each chunk's logits are recomputed in backward instead of kept, and the output head's
weight gradient is accumulated chunk by chunk into one buffer (`_ChunkedHeadLogps`).
"""

from __future__ import annotations

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


class _ChunkedHeadLogps(torch.autograd.Function):
    """log p(label | hidden) through a linear head, chunked in forward AND backward.

    Forward keeps only the [N] results. Backward recomputes each chunk's logits and uses
    d log softmax(z)[y] / dz = onehot(y) - softmax(z), so per chunk it holds one [chunk, V] fp32
    buffer, and it adds the head's weight gradient into a single [V, H] buffer in place. (With
    per-chunk autograd checkpoints every chunk returns its own [V, H] gradient and autograd
    sums them, which holds two such tensors at once: 0.5 GiB each for a 152k x 896 head.)
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens):
        out = torch.empty(labels.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, labels.shape[0], chunk_tokens):
            stop = start + chunk_tokens
            out[start:stop] = _chunk_logps(hidden[start:stop], weight, bias, labels[start:stop])
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.chunk_tokens = chunk_tokens
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
            h, y, g = hidden[start:stop], labels[start:stop], grad_out[start:stop]
            logits = F.linear(h, weight, bias).float()  # [c, V]
            # softmax in place (max, exp, normalise): logsumexp would allocate another [c, V]
            logits.sub_(logits.amax(-1, keepdim=True)).exp_()
            probs = logits.div_(logits.sum(-1, keepdim=True))
            grad_logits = probs.mul_(-g[:, None])  # -g * softmax, in place
            grad_logits[torch.arange(y.shape[0], device=y.device), y] += g
            grad_logits = grad_logits.to(weight.dtype)
            if need_hidden:
                grad_hidden[start:stop] = grad_logits @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), h)
            if need_bias:
                grad_bias += grad_logits.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None


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
    if labels.numel() == 0:
        # hidden.sum(-1) is an empty [0] tensor still tied to the graph, so backward works.
        token_logps = hidden.sum(-1).float()
    elif torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        token_logps = _ChunkedHeadLogps.apply(hidden, head.weight, head.bias, labels,
                                              chunk_tokens)
    else:
        token_logps = torch.cat([
            _chunk_logps(hidden[i:i + chunk_tokens], head.weight, head.bias,
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
