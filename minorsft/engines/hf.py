"""The transformers scoring engine: runs anywhere torch runs (the default without vLLM)."""

from __future__ import annotations

import torch
import transformers

from minorsft.data import Example
from minorsft.logprobs import answer_logps, final_logit_transform, pad_batch
from minorsft.models import (
    autocast_context,
    load_model,
    pick_attention,
    pick_device,
    pick_precision,
    precision_name,
)


def token_budget_batches(examples: list[Example], max_batch_tokens: int) -> list[list[int]]:
    """Indices of `examples` grouped longest-first so each padded batch fits the token budget.

    Sorting by length first means little padding; the budget counts padded tokens
    (rows x longest row), which is what the forward pass pays for.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    batches, current, width = [], [], 0
    for index in order:
        length = len(examples[index].input_ids)
        new_width = max(width, length)
        if current and new_width * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current, new_width = [], length
        current.append(index)
        width = new_width
    if current:
        batches.append(current)
    return batches


# Padded tokens per scoring batch when none is given. On a CPU small batches are faster
# (SmolLM2, 64 GSM8K rows, 2 cores: 373 answer tokens/s at 1024, 343 at 2048, 269 at 8192:
# `benchmarks/bench_scoring.py --methods minorsft --max-batch-tokens N`); a GPU wants large ones.
CPU_BATCH_TOKENS = 1024
ACCELERATOR_BATCH_TOKENS = 16384


def default_batch_tokens(device: torch.device) -> int:
    return CPU_BATCH_TOKENS if device.type == "cpu" else ACCELERATOR_BATCH_TOKENS


class TransformersEngine:
    name = "transformers"
    version = transformers.__version__

    def __init__(self, model_path: str, dtype: str = "auto", device: str = "auto",
                 max_batch_tokens: int | None = None, attention: str = "auto",
                 quantization: str | None = None, adapters: str | None = None):
        self.device = pick_device(device)
        # bf16-mixed: fp32 weights, scored under bf16 autocast (as `train --dtype bf16-mixed`)
        self.dtype, self.autocast = pick_precision(dtype, self.device)
        self.quantization = quantization  # "nf4": --load-in-4bit, as train's QLoRA base
        self.model = load_model(model_path, self.dtype, self.device,
                                pick_attention(attention, self.device), quantization)
        if adapters is not None:  # a LoRA run's output, scored as it trained (eval)
            from minorsft.lora import load_adapters

            self.model = load_adapters(self.model, adapters)
        self.model.eval()
        final_logit_transform(self.model)  # probed once here, not inside the first batch
        self.pad_id = self.model.config.pad_token_id or 0
        self.max_batch_tokens = max_batch_tokens or default_batch_tokens(self.device)

    @property
    def precision(self) -> str:
        """The dtype as the cache records it (a dtype name, or bf16-mixed)."""
        return precision_name(self.dtype, self.autocast)

    @torch.inference_mode()
    def score(self, examples: list[Example]) -> list[float]:
        scores = [0.0] * len(examples)
        for batch in token_budget_batches(examples, self.max_batch_tokens):
            tensors = pad_batch([examples[i].input_ids for i in batch],
                                [examples[i].answer_mask for i in batch], self.pad_id, self.device)
            with autocast_context(self.device, self.autocast):
                sums = answer_logps(self.model, *tensors)
            for index, value in zip(batch, sums.tolist(), strict=True):
                scores[index] = value
        return scores

    @torch.inference_mode()
    def score_tokens(self, examples: list[Example]) -> list[list[float]]:
        """Per-answer-token log-probs of each example, in the order of its answer tokens."""
        values: list[list[float]] = [[] for _ in examples]
        for batch in token_budget_batches(examples, self.max_batch_tokens):
            tensors = pad_batch([examples[i].input_ids for i in batch],
                                [examples[i].answer_mask for i in batch], self.pad_id, self.device)
            with autocast_context(self.device, self.autocast):
                token_logps, sample_index = answer_logps(self.model, *tensors,
                                                         return_tokens=True)
            for row, value in zip(sample_index.tolist(), token_logps.tolist(), strict=True):
                values[batch[row]].append(value)
        return values

    def describe(self) -> dict:
        """The settings worth recording in the cache metadata."""
        return {"dtype": self.precision, "device": self.device.type,
                "max_batch_tokens": self.max_batch_tokens,
                **({"quantization": self.quantization} if self.quantization else {})}

    def close(self) -> None:
        """Drop the model so its memory can be reused."""
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
