"""Scoring engines: given token ids and answer masks, return each answer's summed log-prob.

Every engine has the same small interface (`ScoringEngine`) so that `precompute` does not care
which one runs; engines know nothing of training.
"""

from __future__ import annotations

from typing import Protocol

from minorsft.data import Example

ENGINE_NAMES = ("auto", "transformers")


class ScoringEngine(Protocol):
    name: str
    version: str

    def score(self, examples: list[Example]) -> list[float]:
        """Summed answer log-probs, one per example, in the order given."""
        ...


def make_engine(name: str, model_path: str, dtype: str, device: str = "auto",
                max_batch_tokens: int = 8192) -> ScoringEngine:
    if name in {"auto", "transformers"}:
        from minorsft.engines.hf import TransformersEngine

        return TransformersEngine(model_path, dtype=dtype, device=device,
                                  max_batch_tokens=max_batch_tokens)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
