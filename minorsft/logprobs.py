"""Per-sample summed answer log-probs, log pi(y|x), from a causal LM.

Token t is predicted by position t-1, so the answer mask is shifted by one against the logits.
Only answer positions need logits: `answer_logps` runs the decoder, picks the hidden states that
predict answer tokens and applies the output head to them in chunks, so memory never holds a
[B, T, V] tensor (for a 152k vocabulary that tensor is the largest thing in the step). In
training each chunk is recomputed in backward (checkpointed) so its logits are not kept either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 1024


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


def _final_logit_transform(model):
    """Models whose logits are more than `lm_head(hidden)` (softcapping, scaling) need logits."""
    config = model.config
    return bool(getattr(config, "final_logit_softcapping", None)) or bool(
        getattr(config, "logit_scale", None)
    )


def answer_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_mask: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    position_ids: torch.Tensor | None = None,
    return_tokens: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs [B] (fp32) for right-padded batches.

    Args:
        model: a transformers causal LM.
        input_ids: [B, T].
        attention_mask: [B, T], 1 for real tokens.
        answer_mask: [B, T], true for answer tokens (never on the first position).
        chunk_tokens: answer positions sent through the output head at once.
        position_ids: optional [B, T] positions.
        return_tokens: return the per-token log-probs [N] of the answer tokens (row-major
            order) and their sample index [N] instead of the sums (for drift checks).
    """
    if _final_logit_transform(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids).logits
        if not return_tokens:
            return sequence_logps(logits, input_ids, answer_mask.bool())
        sample_index, position = answer_mask[:, 1:].bool().nonzero(as_tuple=True)
        token_logps = torch.log_softmax(logits[sample_index, position].float(), dim=-1)
        labels = input_ids[sample_index, position + 1].unsqueeze(-1)
        return token_logps.gather(-1, labels).squeeze(-1), sample_index

    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state  # [B, T, H]
    predicting = answer_mask[:, 1:].bool()  # [B, T-1]: position t-1 predicts answer token t
    sample_index, position = predicting.nonzero(as_tuple=True)  # [N], [N]
    picked_hidden = hidden[sample_index, position]  # [N, H]
    labels = input_ids[sample_index, position + 1]  # [N]
    chunks = []
    for start in range(0, labels.numel(), chunk_tokens):
        stop = start + chunk_tokens
        args = (picked_hidden[start:stop], head.weight, head.bias, labels[start:stop])
        if torch.is_grad_enabled() and picked_hidden.requires_grad:
            chunks.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            chunks.append(_chunk_logps(*args))
    token_logps = torch.cat(chunks) if chunks else picked_hidden.new_zeros(0, dtype=torch.float32)
    if return_tokens:
        return token_logps, sample_index
    summed = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    return summed.index_add(0, sample_index, token_logps)
