"""The vLLM scoring engine: prompt log-probs of given token ids, the fast path on GPUs.

Each sample is sent as the exact token ids the data step produced (`TokensPrompt`, so vLLM never
re-tokenizes) with ``max_tokens=1`` and ``prompt_logprobs=0``: vLLM then returns, for every
prompt position t >= 1, the log-prob of the token actually at t given the tokens before it. The
answer positions are summed. Settings that keep these numbers honest:

- ``logprobs_mode="raw_logprobs"``: log-softmax of the model's logits, before any sampling
  processor (temperature, penalties) could touch them;
- ``enable_prefix_caching=False``: a cached prefix computed in another batch could differ in the
  last bits from a fresh one, and scoring must not depend on the order of the data;
- ``max_num_batched_tokens``: prompt log-probs materialise a [tokens x vocab] fp32 tensor per
  engine step (152k vocab x 8k tokens = 5 GB for Qwen2, with the bf16 logits beside it about
  7.5 GB), so the step's token budget bounds it. vLLM's memory profiling does not count it
  (vllm-project/vllm#5907): it comes on top of --gpu-memory-utilization.

vLLM is imported here only, when the engine is built, so that minorsft runs without it. vLLM
starts its engine core in a spawned process: the calling script must guard its entry point with
``if __name__ == "__main__":`` (the `minorsft` console script and ``python -m minorsft`` do).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from minorsft.data import Example
from minorsft.models import (
    MIXED_PRECISIONS,
    ModelError,
    context_length,
    dtype_name,
    pick_dtype,
    read_model_config,
)

# vLLM's own names for the dtypes minorsft uses.
_VLLM_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def vllm_available() -> bool:
    """Whether vLLM is installed (it may still fail to start).

    A spec without an origin is a namespace package, i.e. some folder called `vllm` on the
    path, not the library.
    """
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def cuda_available() -> bool:
    return torch.cuda.is_available()


@contextlib.contextmanager
def _one_past_the_model_limit(model_path: str, max_model_len: int | None):
    """Let vLLM take a max_model_len of the model's limit + 1, which it refuses by default.

    A sample as long as the model's context (what `--max-length` equal to it produces) needs
    one more: vLLM counts the token it generates after the prompt. Scoring never reads that
    token, so no position past the model's limit is ever computed. Larger values stay refused.
    """
    limit = context_length(read_model_config(model_path))
    if max_model_len is None or limit is None or max_model_len != limit + 1:
        yield
        return
    name, before = "VLLM_ALLOW_LONG_MAX_MODEL_LEN", os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN")
    os.environ[name] = "1"  # read while vLLM builds its config, in this process
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


class VLLMEngine:
    """Scores answers with `vllm.LLM`; one engine per instance, started in the constructor.

    Args:
        model_path: a Hugging Face folder or hub id.
        dtype: auto (bf16 on GPU, fp32 on CPU, as the transformers engine), float32, bfloat16 or
            float16. Always passed to vLLM explicitly so the cache records what really ran.
        max_batch_tokens: vLLM's ``max_num_batched_tokens``, tokens per engine step.
        tensor_parallel_size: GPUs to shard the model over.
        gpu_memory_utilization: share of GPU memory vLLM may take (weights + KV cache). On the
            CPU backend it is the share of RAM, and vLLM's 0.92 default is refused there, so
            None means 0.9 on GPU and 0.3 on CPU.
        max_model_len: longest sequence (prompt + 1); None lets vLLM take the model's limit.
            The model's limit + 1 is allowed (a sample of the model's full length).
        enforce_eager: skip CUDA graphs / compilation: faster start, slower steps.
    """

    name = "vllm"

    def __init__(self, model_path: str, dtype: str = "auto", max_batch_tokens: int | None = None,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, enforce_eager: bool = False, seed: int = 0):
        import vllm

        self.version = vllm.__version__
        self.max_batch_tokens = max_batch_tokens or 8192
        on_gpu = cuda_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        if dtype in MIXED_PRECISIONS:
            raise ModelError(f"--dtype {dtype} (autocast) is a transformers setting; "
                             "vLLM scores in one dtype: use bfloat16, float16 or float32")
        self.dtype = pick_dtype(dtype, self.device)
        self.precision = dtype_name(self.dtype)  # as the cache records it
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.9 if on_gpu else 0.3
        self.settings = {
            "dtype": _VLLM_DTYPE[self.dtype],
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "max_num_batched_tokens": self.max_batch_tokens,
            "enable_prefix_caching": False,
            "logprobs_mode": "raw_logprobs",
            "enforce_eager": enforce_eager,
            "seed": seed,
        }
        with _one_past_the_model_limit(model_path, max_model_len):
            self.llm = vllm.LLM(model=model_path, tokenizer=model_path, **self.settings)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._sampling = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0,
                                             detokenize=False)
        self._prompt_class = vllm.TokensPrompt

    def describe(self) -> dict:
        """The settings worth recording in the cache metadata."""
        return dict(self.settings, dtype=self.precision, device=self.device.type,
                    max_model_len=self.max_model_len)

    def score_tokens(self, examples: list[Example]) -> list[list[float]]:
        """Per-answer-token log-probs of each example, in the order of its answer tokens."""
        too_long = [e for e in examples if len(e.input_ids) + 1 > self.max_model_len]
        if too_long:
            longest = max(len(e.input_ids) for e in too_long)
            raise ValueError(
                f"{len(too_long)} sample(s) (row {too_long[0].line} first, longest {longest} "
                f"tokens) do not fit vLLM's max_model_len {self.max_model_len} (it needs the "
                "sequence + 1): raise --max-model-len or lower --max-length")
        prompts = [self._prompt_class(prompt_token_ids=list(e.input_ids)) for e in examples]
        outputs = self.llm.generate(prompts, self._sampling, use_tqdm=False)
        return [_answer_token_logps(e, out.prompt_logprobs)
                for e, out in zip(examples, outputs, strict=True)]

    def score(self, examples: list[Example]) -> list[float]:
        """Summed answer log-probs, one per example, in the order given."""
        return [float(sum(tokens)) for tokens in self.score_tokens(examples)]

    def close(self) -> None:
        """Stop the engine core and free its memory (the trainer's check may need the GPU)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine_core = getattr(llm.llm_engine, "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        self.llm = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _answer_token_logps(example: Example, prompt_logprobs) -> list[float]:
    """Pick the answer positions out of vLLM's prompt log-probs.

    `prompt_logprobs[t]` maps token ids to `Logprob` for position t (None at t = 0, which has no
    prediction); with ``prompt_logprobs=0`` it holds just the token actually at t.
    """
    if prompt_logprobs is None or len(prompt_logprobs) != len(example.input_ids):
        raise RuntimeError(f"vLLM returned no prompt log-probs for row {example.line}")
    values = []
    for position, (token, is_answer) in enumerate(
            zip(example.input_ids, example.answer_mask, strict=True)):
        if not is_answer:
            continue
        if position == 0:
            raise ValueError(f"row {example.line}: the first token cannot be an answer token")
        values.append(float(prompt_logprobs[position][token].logprob))
    return values
