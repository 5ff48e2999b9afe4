"""Padding-free packing: several samples in one row, each attending only to itself.

A micro-batch of samples of lengths L_1..L_B becomes one row of sum(L_i) tokens with
position ids that restart at 0 for every sample, and no attention mask. transformers reads the
sample boundaries from the position ids:

- with `flash_attention_2` it calls flash-attn's varlen kernel (cumulative sequence lengths
  taken from where the positions restart), so no padding is computed at all;
- with `sdpa`, `eager` or `flex_attention` its mask builder (`masking_utils`) turns the same
  position ids into a block-diagonal causal mask.

transformers' dense mask makes attention cost (sum of lengths)^2, so for SDPA models
`prepare_packing` switches to `minorsft.attention`'s per-sample SDPA, which cuts the row at the
same boundaries instead. Either way a token never sees another sample's tokens, the rotary
positions are the ones the sample would have alone, and every sample's summed answer log-prob
equals the unpacked one (up to float rounding; `tests/test_logprobs.py` and
`tests/test_attention.py` check values and gradients). The one thing to keep
is `attention_mask=None` and no KV cache: with a 2D mask or a cache transformers does not look
for packed sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from minorsft.attention import (
    SEGMENT_ATTENTION,
    check_packed_isolation,
    fit_layouts_to,
    layout_note,
    packed_forward_kwargs,
    packed_sample_lengths,
    use_segment_attention,
    without_packed_row_detection,
)
from minorsft.logprobs import answer_logps, final_logit_transform, head_logps, pad_batch
from minorsft.models import to_device

PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3", "sdpa", "eager", "flex_attention",
                     SEGMENT_ATTENTION)


@dataclass
class PackedBatch:
    """One packed row and where each sample's answer tokens are predicted from."""

    input_ids: torch.Tensor  # [1, L], L = sum of the samples' lengths
    position_ids: torch.Tensor  # [1, L], restarting at 0 for each sample
    positions: torch.Tensor  # [N] positions whose next token is an answer token
    sample_index: torch.Tensor  # [N] the sample each of those positions belongs to
    lengths: list[int]  # the samples' lengths, in order

    @property
    def num_samples(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]


def pack_batch(input_ids: list[list[int]], answer_masks: list[list[bool]],
               device: torch.device) -> PackedBatch:
    """Concatenate samples into one row; positions predicting answer tokens stay per sample.

    A position predicts the next token of its own sample only: the last token of a sample never
    predicts the first token of the next one, whatever the answer masks say. (Built with tensor
    operations, not a loop over tokens: on a GPU the device waits while the host packs.)
    """
    for sample, (sample_ids, mask) in enumerate(zip(input_ids, answer_masks, strict=True)):
        if len(sample_ids) != len(mask):
            raise ValueError(f"sample {sample}: {len(sample_ids)} token ids but "
                             f"{len(mask)} answer-mask entries")
    lengths = [len(sample_ids) for sample_ids in input_ids]
    counts = torch.tensor(lengths, dtype=torch.long)
    starts = torch.cumsum(counts, 0) - counts  # where each sample begins in the row
    sample_of_token = torch.repeat_interleave(torch.arange(len(lengths)), counts)
    position_ids = torch.arange(int(counts.sum())) - starts[sample_of_token]
    # numpy reads a Python list 4 x faster than torch.tensor does
    is_answer = torch.from_numpy(np.fromiter(chain.from_iterable(answer_masks), dtype=np.bool_))
    # token t (not a sample's first) is predicted by position t - 1 of the same sample
    answer_tokens = (is_answer & (position_ids > 0)).nonzero().squeeze(1)
    row = torch.from_numpy(np.fromiter(chain.from_iterable(input_ids), dtype=np.int64))
    return PackedBatch(to_device(row[None], device), to_device(position_ids[None], device),
                       to_device(answer_tokens - 1, device),
                       to_device(sample_of_token[answer_tokens], device), lengths)


def check_packing_support(model) -> None:
    """Refuse attention implementations whose packed-sequence handling is not known to us."""
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in PACKING_ATTENTION:
        raise ValueError(f"--packing needs one of the attention implementations "
                         f"{', '.join(PACKING_ATTENTION)}; the model uses {attention!r}")
    if not attention.startswith("flash_attention"):
        try:
            from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
        except ImportError as error:
            raise ValueError("--packing without flash-attn needs a transformers version whose "
                             "mask builder reads packed sequences from position ids (>= 4.54)"
                             ) from error


def prepare_packing(model, requested: bool | None) -> tuple[bool, str]:
    """Decide whether to pack micro-batches; switch SDPA models to per-sample attention.

    Args:
        model: the policy (before LoRA or distributed wrappers).
        requested: True (--packing), False (--no-packing) or None (auto: pack where no dense
            block mask is needed, i.e. under flash-attn or per-sample SDPA, if the model passes
            the isolation check; pad otherwise).

    Returns:
        (packing, a line saying what was chosen and why).
    """
    if requested is False:
        return False, "padded micro-batches (--no-packing)"
    fit_layouts_to(model.get_input_embeddings().weight.device)
    original = model.config._attn_implementation
    per_sample = original.startswith("flash_attention") or use_segment_attention(model)
    if requested is None and not per_sample:
        return False, (f"padded micro-batches (packed rows under {original!r} attention need a "
                       "dense block mask, which is slower than padding)")
    check_packing_support(model)
    try:
        check_packed_isolation(model)
    except ValueError as error:
        if requested:
            raise
        model.set_attn_implementation(original)
        return False, f"padded micro-batches ({error})"
    attention = model.config._attn_implementation
    if attention == SEGMENT_ATTENTION:
        attention = layout_note(model.get_input_embeddings().weight.device)
    return True, f"packed micro-batches, no padding ({attention} attention)"


def packed_answer_logps(model, packed: PackedBatch, blocks: tuple[int, int] | None = None
                        ) -> torch.Tensor:
    """Summed answer log-probs [B] (fp32) of the samples packed in `packed`."""
    labels = packed.input_ids[0, packed.positions + 1]  # [N]
    if final_logit_transform(model):  # softcapped/scaled logits: take them from the model
        logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                       attention_mask=None, use_cache=False).logits[0]  # [L, V]
        token_logps = torch.log_softmax(logits[packed.positions].float(), dim=-1)
        token_logps = token_logps.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [N]
        summed = token_logps.new_zeros(packed.num_samples)
        return summed.index_add(0, packed.sample_index, token_logps)
    # The attention takes the lengths as given (else it reads them in every layer).
    attention = model.config._attn_implementation
    segments = packed_forward_kwargs(packed.lengths, packed.input_ids.device, attention)
    with packed_sample_lengths(packed.lengths, packed.position_ids), \
            without_packed_row_detection(attention):
        hidden = model.get_decoder()(
            input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
            use_cache=False,  # with a cache transformers would not detect the packed samples
            **segments,
        ).last_hidden_state[0]  # [L, H]
    return head_logps(model, hidden[packed.positions], labels, packed.sample_index,
                      packed.num_samples, blocks)


def micro_batch_logps(model, rows: list[dict], pad_id: int, device: torch.device,
                      packing: bool) -> tuple[torch.Tensor, int]:
    """Policy log-probs [B] of cache rows, packed or right-padded; and the real tokens run."""
    input_ids = [row["input_ids"] for row in rows]
    answer_masks = [row["answer_mask"] for row in rows]
    if packing:
        packed = pack_batch(input_ids, answer_masks, device)
        return packed_answer_logps(model, packed), packed.num_tokens
    ids, attention_mask, answer_mask = pad_batch(input_ids, answer_masks, pad_id, device)
    # the token count from the host's lists: attention_mask.sum() would wait for the device
    return answer_logps(model, ids, attention_mask, answer_mask), sum(map(len, input_ids))
