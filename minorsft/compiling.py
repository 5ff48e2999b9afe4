"""`--compile`: the policy's decoder layers and its output head's arithmetic through
`torch.compile`.

At Qwen2-0.5B's size a training step on a GPU is bound by kernel launches, not arithmetic: the
RMS norms, rotary embeddings, residual adds and the MLP's activation are each a handful of small
elementwise kernels per layer, forward and backward (docs/performance.md). Compiling a decoder
layer fuses them into a few generated kernels and launches them from generated code.

Each layer is compiled on its own (they share one compiled graph: their code is the same, their
weights are the graph's inputs) with dynamic shapes, so a new packed length does not compile
again. In the varlen layout (CUDA) the attention call is part of the layer's graph; the
per-sample and padded layouts stay eager (`minorsft.attention` marks them so): they loop over
each batch's sample lengths. The output head stays minorsft's blocked log-prob function, a
Python loop over vocabulary slices; what is compiled there is each block's arithmetic after the
matmul (`minorsft.logprobs.use_compiled_head`): eager, the softmax, its gradient and the casts
are about a dozen passes over an [N, V_b] buffer; compiled, inductor generated one kernel after
the matmul for each direction on a CPU (its output code). The first step pays
for compiling (about 9 s on an H200); a pass whose autograd mode differs (the step-0 check)
compiles its own graph once. `train` compiles by default on CUDA (where Triton is installed),
not on CPUs.
"""

from __future__ import annotations

import importlib.util

import torch

from minorsft.logprobs import use_compiled_head

# Device types where `train` compiles without being asked (--compile/--no-compile decide
# otherwise). On an H200 (torch 2.11, bf16, batch 8 of 256-1024 tokens, varlen attention) the
# compiled layers trained at 1.21 x the eager tokens/s for a Qwen2-0.5B shape and 1.22 x for
# 1.5B once lengths repeat, with a 2.4-5.0 GiB lower peak, after a first step of about 9 s
# (`benchmarks/gpu_check.py`, section 5; docs/performance.md). On a 2-core CPU SmolLM2's steps
# took 0.95 x the eager time after a 10 s longer first step: eager there unless asked.
COMPILE_BY_DEVICE: frozenset[str] = frozenset({"cuda"})


def triton_available() -> bool:
    """torch.compile generates Triton kernels for CUDA devices."""
    return importlib.util.find_spec("triton") is not None


def default_compile_skip(device: torch.device) -> str | None:
    """Why `train` leaves the layers eager on this device unasked; None where it compiles them
    (one process or DDP)."""
    if device.type not in COMPILE_BY_DEVICE:
        return f"the default on {device.type}"
    if device.type == "cuda" and not triton_available():
        return "torch.compile needs Triton on CUDA"
    return None


def compiles_by_default(device: torch.device) -> bool:
    """Whether `train` compiles the layers on this device unasked (one process or DDP)."""
    return default_compile_skip(device) is None


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's repeated decoder blocks (`model.get_decoder().layers` for transformers LMs)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"--compile: {type(model).__name__} has no list of decoder layers at "
                         "model.get_decoder().layers; train it without --compile")
    return layers


def compile_decoder_layers(model) -> int:
    """Compile every decoder layer in place (dynamic shapes); returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def compile_model(model) -> int:
    """Compile the decoder layers and the output head's block arithmetic; returns the layers."""
    count = compile_decoder_layers(model)
    use_compiled_head(model)
    return count
