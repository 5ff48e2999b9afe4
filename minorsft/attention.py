"""Attention for packed rows without flash-attn: each sample attends to itself, at its own cost.

Given a packed row (several samples concatenated, position ids restarting at 0 for each sample)
and no attention mask, transformers' `sdpa` path isolates the samples with a dense
block-diagonal [L, L] mask, L being the sum of the sample lengths: attention then costs L^2
instead of the sum of squares, and on a CPU packing came out slower than padding
(docs/performance.md). flash-attn's varlen kernel avoids this by cutting the row at the sample
boundaries; `segment_sdpa_attention` does the same with what PyTorch has, in one of three
layouts (`LAYOUT_BY_DEVICE`): on CUDA, PyTorch's own flash-attention varlen kernel, one call per
layer over the whole row; on CPUs, causal SDPA on each sample's slice of queries, keys and
values; and, a default nowhere, one SDPA call on the samples gathered into a right-padded
batch. The sample boundaries come from `minorsft.packing` (or, failing that, from the position
ids, where they stop counting up by one, as transformers' `find_packed_sequence_indices` does).

It is registered with transformers under `SEGMENT_ATTENTION`, next to a mask function that
builds no mask for packed rows (the samples are cut apart instead) and the usual SDPA mask for
padded batches, which it hands to transformers' own SDPA function unchanged. `use_segment_attention`
switches a model to it where that is safe; `check_packed_isolation` proves on the model itself,
before training, that a packed row gives each sample the hidden states it has alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools

import torch

from minorsft.models import to_device

try:  # PyTorch's flash-attention varlen kernel (torch >= 2.10)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None
# Later torch versions refuse fewer key/value heads than query heads (grouped-query attention,
# as in Qwen2) unless told; the first ones took them without the flag.
_VARLEN_GQA_FLAG = (varlen_attn is not None
                    and "enable_gqa" in inspect.signature(varlen_attn).parameters)

SEGMENT_ATTENTION = "minorsft_segment_sdpa"


def lengths_from_positions(position_ids: torch.Tensor | None) -> list[int] | None:
    """Lengths of the samples in a packed [1, L] row; None if the row holds one sample."""
    if position_ids is None:
        return None
    restarts = torch.diff(position_ids, dim=-1) != 1  # [B, L-1]: a new sample starts after it
    if not bool(restarts.any()):
        return None
    if position_ids.shape[0] != 1:
        raise ValueError("packed rows must come one per batch (position ids of shape [1, L]); "
                         f"got position ids of shape {tuple(position_ids.shape)}")
    starts = [0, *(restarts[0].nonzero().flatten() + 1).tolist(), position_ids.shape[-1]]
    return [stop - start for start, stop in zip(starts[:-1], starts[1:], strict=True)]


# On CUDA, SDPA may pick cuDNN attention, which builds a plan for every new sequence length,
# and every packed sample is one: on an H200 (torch 2.11) a packed micro-batch of 8 new lengths
# took 1.24 s with every backend allowed (cuDNN chosen) against 0.16 s without cuDNN
# (`benchmarks/gpu_packed_attention.py`); the padded layout meets a new longest length in most
# micro-batches too. Packed rows therefore leave cuDNN out; flash is then chosen where it
# applies, math as the last resort.
_PACKED_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


# How a packed row is cut apart, by device type (see `segment_sdpa_attention`). On a 2-core CPU
# a SmolLM2 step on 4 GSM8K rows took 4.68 s per-sample and 4.92 s padded (8,410 vs 7,596 torch
# operations), and with 8 rows the padded layout's peak was 290 MiB (6 %) higher
# (`benchmarks/cpu_probes.py layouts`): per-sample there. On an H200 (torch 2.11, bf16, batch 8
# of 256-1024 tokens) the varlen layout trained at 1.08 x per-sample's tokens/s for a
# Qwen2-0.5B shape and 1.08 x for 1.5B once lengths repeat, and gave the same attention
# outputs and q/k/v gradients as per-sample flash attention (`benchmarks/gpu_check.py`,
# sections 1b and 5; docs/performance.md). Where varlen cannot run (fp32) per-sample is used.
LAYOUT_BY_DEVICE: dict[str, str] = {"cuda": "varlen"}
DEFAULT_LAYOUT = "per-sample"
LAYOUTS = ("per-sample", "padded", "varlen")


def fit_layouts_to(device: torch.device) -> None:
    """Before a run: GPUs older than Ampere (compute capability 8.0) have no flash attention, so
    packed rows there take the per-sample layout instead of varlen. (Decided once, outside the
    compiled layers, which read the layout table as a constant.)"""
    if (device.type == "cuda" and LAYOUT_BY_DEVICE.get("cuda") == "varlen"
            and torch.cuda.get_device_capability(device) < (8, 0)):
        LAYOUT_BY_DEVICE["cuda"] = DEFAULT_LAYOUT


def layout_for(device: torch.device) -> str:
    """The layout packed rows take on this device type."""
    return LAYOUT_BY_DEVICE.get(device.type, DEFAULT_LAYOUT)


# The current packed row's sample lengths, set by `minorsft.packing` around the forward pass
# (`packed_sample_lengths`). Without them every layer would read the lengths from the position
# ids, which on a GPU waits for the device once per layer. They travel beside the model call, not
# through it: a list argument would be part of what `torch.compile` guards on, and every new
# number of samples would compile the decoder layers again.
_PACKED_LENGTHS: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar(
    "minorsft_packed_lengths", default=None)


# The same lengths are also kept on the packed row's position-ids tensor, for as long as it
# lives: gradient checkpointing recomputes a layer in backward, outside the block below, and
# hands it the same position-ids tensor again (without them, each recomputed layer would read
# the lengths from it, waiting for the device).
_LENGTHS_ATTRIBUTE = "_minorsft_packed_lengths"


@contextlib.contextmanager
def packed_sample_lengths(lengths: list[int], position_ids: torch.Tensor | None = None):
    """Within this block, packed rows are cut at these sample lengths (they must sum to L); and
    wherever `position_ids` (the row's, if given) comes back, as in a recomputed layer."""
    if position_ids is not None:
        setattr(position_ids, _LENGTHS_ATTRIBUTE, tuple(lengths))
    token = _PACKED_LENGTHS.set(tuple(lengths))
    try:
        yield
    finally:
        _PACKED_LENGTHS.reset(token)


# The attention implementations whose mask functions return no mask for a packed row without a
# padding mask (ours, and transformers' for flash-attn): the row's sample boundaries reach their
# attention calls from minorsft, not from a mask.
_BOUNDARIES_FROM_MINORSFT = (SEGMENT_ATTENTION, "flash_attention_2", "flash_attention_3")


@contextlib.contextmanager
def without_packed_row_detection(attention: str):
    """Within this block, transformers does not look for packed samples in the position ids.

    Before building a mask, transformers finds where a packed row's position ids restart and
    asks the device whether they restart at all: a wait for the device on every forward pass,
    after which it idles until Python queues more work (with gradient accumulation, that drains
    the previous micro-batch's backward). For the attention implementations above the answer is
    unused (their masks are None either way), so it is not asked. The switch is a context
    variable read by a wrapper installed once, so no other thread or call sees it.
    """
    if attention not in _BOUNDARIES_FROM_MINORSFT or not _install_detection_switch():
        yield
        return
    token = _SKIP_PACKED_DETECTION.set(True)
    try:
        yield
    finally:
        _SKIP_PACKED_DETECTION.reset(token)


_SKIP_PACKED_DETECTION = contextvars.ContextVar("minorsft_skip_packed_detection", default=False)


def _install_detection_switch() -> bool:
    """Wrap transformers' packed-row detection once; False where this transformers has none."""
    from transformers import masking_utils

    detect = getattr(masking_utils, "find_packed_sequence_indices", None)
    if detect is None:
        return False
    if not getattr(detect, "_minorsft_switch", False):
        def find_packed_sequence_indices(position_ids):
            return None if _SKIP_PACKED_DETECTION.get() else detect(position_ids)

        find_packed_sequence_indices._minorsft_switch = True
        masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    return True


def segment_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """transformers attention function: [B, heads, L, D] in, [B, L, heads, D] out.

    In the varlen layout, given the row's cumulative sample lengths (`packed_forward_kwargs`, the
    names transformers uses for flash-attn), it is one varlen flash call, which `torch.compile`
    can keep inside a compiled layer. Everything else goes to `_segment_attention_eager`, which
    compiled layers call eagerly.
    """
    bounds = kwargs.get("cu_seq_lens_q")
    if attention_mask is None and bounds is not None:
        if (inputs := _varlen_inputs(query, key, value, dropout)) is not None:
            return _varlen_flash(*inputs, bounds, kwargs["max_length_q"], scaling), None
    return _segment_attention_eager(module, query, key, value, attention_mask, dropout=dropout,
                                    scaling=scaling, **kwargs)


# torch.compile (--compile) leaves this part eager: its loop over the samples depends on each
# batch's lengths, and traced it would compile anew for every batch.
@torch.compiler.disable
def _segment_attention_eager(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """Packed rows (no mask, position ids restarting) run causal SDPA on each sample alone; anything
    else is transformers' SDPA as usual. The sample lengths come from `packed_sample_lengths`
    where the caller set them (also for the same position ids recomputed by gradient
    checkpointing in backward), else from the position ids.

    Two layouts give the same result. "per-sample" calls SDPA once per sample on its slice of
    the row: no padding computed at all, but a call (and in backward a second one) per sample
    and layer. "padded" gathers the samples into a [samples, longest] batch for one causal SDPA
    call per layer and scatters the outputs back: attention then computes the padding (only
    attention; the rest of the model still runs on the packed row), but the number of kernel
    launches no longer grows with the samples, which is what a GPU step is bound by at these
    sizes (docs/performance.md).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = None
    if attention_mask is None:
        position_ids = kwargs.get("position_ids")
        lengths = (_PACKED_LENGTHS.get() or getattr(position_ids, _LENGTHS_ATTRIBUTE, None)
                   or lengths_from_positions(position_ids))
    if lengths is None or len(lengths) == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if sum(lengths) != query.shape[2]:
        raise ValueError(f"packed sample lengths {list(lengths)} sum to {sum(lengths)}, the row "
                         f"has {query.shape[2]} tokens")
    if (inputs := _varlen_inputs(query, key, value, dropout)) is not None:
        bounds = _cumulative_lengths(tuple(lengths), query.device)
        return _varlen_flash(*inputs, bounds, max(lengths), scaling), None
    with _packed_backends(query.device):
        if layout_for(query.device) == "padded":
            return _padded_sdpa(module, query, key, value, lengths, dropout, scaling), None
        outputs = [
            sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling,
                                   is_causal=True)[0]
            for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2),
                               value.split(lengths, dim=2), strict=True)
        ]
    return torch.cat(outputs, dim=1), None


def _padded_sdpa(module, query, key, value, lengths: list[int], dropout: float,
                 scaling: float | None) -> torch.Tensor:
    """Causal SDPA on the packed samples gathered into a right-padded batch; [1, L, H, D] out.

    A sample's padding comes after its last token, so under the causal mask no real query sees
    a padded key; padded queries' outputs are dropped when scattering back (and get no gradient).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gather, scatter = _padding_indices(tuple(lengths), query.device)
    samples, longest = len(lengths), max(lengths)

    def padded(x):  # [1, heads, L, D] -> [samples, heads, longest, D]
        heads, dim = x.shape[1], x.shape[3]
        return x[0].index_select(1, gather).view(heads, samples, longest, dim).transpose(0, 1)

    out = sdpa_attention_forward(module, padded(query), padded(key), padded(value), None,
                                 dropout=dropout, scaling=scaling, is_causal=True)[0]
    # out: [samples, longest, heads, D] -> the packed row's [1, L, heads, D]
    return out.reshape(samples * longest, *out.shape[2:]).index_select(0, scatter).unsqueeze(0)


def layout_note(device: torch.device) -> str:
    """How packed rows are cut apart on this device, for the train log."""
    layout = layout_for(device)
    if layout == "varlen":
        return "varlen flash attention in bf16/fp16, per-sample SDPA in fp32"
    return f"{layout} SDPA"


def varlen_supported(query: torch.Tensor) -> bool:
    """PyTorch's varlen attention runs flash attention: CUDA, half precision, torch >= 2.10."""
    return (varlen_attn is not None and query.device.type == "cuda"
            and query.dtype in (torch.bfloat16, torch.float16))


def _varlen_inputs(query, key, value, dropout: float):
    """(query, key, value) as the varlen kernel takes them, or None where it cannot run them:
    not this device's layout, dropout, or not half precision.

    Under bf16 autocast (`--dtype bf16-mixed`) the query and key come out of the rotary
    embedding in fp32 while the value is bf16; autocast would run SDPA in bf16, so they are cast
    to the autocast dtype here as well (else fp32 would send every layer down the eager path).
    """
    if layout_for(query.device) != "varlen" or dropout != 0.0:
        return None
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if not (varlen_supported(query) and key.dtype == value.dtype == query.dtype):
        return None
    return query, key, value


def _varlen_flash(query, key, value, bounds: torch.Tensor, longest: int,
                  scaling: float | None) -> torch.Tensor:
    """Causal flash attention over the packed row cut at `bounds`; [1, L, heads, D] out.

    bounds: int32 [samples + 1] cumulative sample lengths; longest: the longest sample.
    """
    # [1, heads, L, D] -> contiguous [L, heads, D], the kernel's layout (flash reads the
    # key/value heads of a grouped-query model natively, as SDPA's flash path does)
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))
    grouped = {"enable_gqa": True} if _VARLEN_GQA_FLAG and k.shape[1] != q.shape[1] else {}
    out = varlen_attn(q, k, v, bounds, bounds, longest, longest, scale=scaling,
                      window_size=(-1, 0), **grouped)  # (-1, 0): causal
    return out.unsqueeze(0)


def packed_forward_kwargs(lengths: list[int], device: torch.device,
                          attention: str = SEGMENT_ATTENTION) -> dict:
    """What a packed row's forward pass passes down to the attention calls: the cumulative
    lengths (under transformers' names for them) for flash-attn models and for per-sample SDPA
    in the varlen layout, else nothing. (flash-attn models would otherwise derive them from the
    position ids in every layer, each time waiting for the device.)"""
    if attention == SEGMENT_ATTENTION and layout_for(device) != "varlen":
        return {}
    if attention != SEGMENT_ATTENTION and not attention.startswith("flash_attention"):
        return {}
    bounds = _cumulative_lengths(tuple(lengths), device)
    longest = max(lengths)
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest,
            "max_length_k": longest}


def _cumulative_lengths(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 [0, L_1, L_1 + L_2, ...] on the device, built once per forward pass."""
    key = ("cumulative", lengths, device)
    if key not in _INDEX_CACHE:
        _INDEX_CACHE.clear()  # only the current micro-batch's lengths are worth keeping
        bounds = [0, *itertools.accumulate(lengths)]
        _INDEX_CACHE[key] = to_device(torch.tensor(bounds, dtype=torch.int32), device)
    return _INDEX_CACHE[key]


_INDEX_CACHE: dict[tuple, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}


def _padding_indices(lengths: tuple[int, ...], device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors between a packed row and its [samples, longest] padded form.

    gather [samples * longest]: the row position each padded slot reads (pad slots repeat their
    sample's last token, so they hold finite values of the same sample); scatter [L]: the padded
    slot each row position comes back from. Built once per forward pass (every layer asks for
    the same lengths), on the host, then moved to the device.
    """
    key = (lengths, device)
    if key not in _INDEX_CACHE:
        longest = max(lengths)
        gather, scatter, start = [], [], 0
        for sample, length in enumerate(lengths):
            gather.extend(start + min(j, length - 1) for j in range(longest))
            scatter.extend(sample * longest + j for j in range(length))
            start += length
        _INDEX_CACHE.clear()  # only the current micro-batch's lengths are worth keeping
        _INDEX_CACHE[key] = (to_device(torch.tensor(gather), device),
                             to_device(torch.tensor(scatter), device))
    return _INDEX_CACHE[key]


def _packed_backends(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in _PACKED_BACKENDS])


def _segment_mask(*args, attention_mask=None, **kwargs):
    """No mask where there is no padding mask (packed rows are cut apart instead)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SEGMENT_ATTENTION, segment_sdpa_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, _segment_mask)


def _mask_only_causal(config) -> bool:
    """True when attention is plain causal: no sliding windows, no softcapping, no layer mix."""
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    if getattr(config, "attn_logit_softcapping", None):
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return set(layer_types) == {"full_attention"}


def use_segment_attention(model) -> bool:
    """Switch an SDPA model to per-sample attention for packed rows; True if switched.

    Models with sliding windows or softcapped attention keep transformers' own masks (correct
    for packed rows, only slower), as do eager and flash-attn models (flash-attn is already
    varlen).
    """
    config = model.config
    if config._attn_implementation != "sdpa" or not _mask_only_causal(config):
        return False
    _register()
    model.set_attn_implementation(SEGMENT_ATTENTION)
    return model.config._attn_implementation == SEGMENT_ATTENTION


@torch.no_grad()
def check_packed_isolation(model) -> float:
    """Run two short samples packed and alone; raise if the packed row mixes them.

    Returns the largest difference between a packed sample's final hidden states and its own,
    relative to how far they move when the samples are concatenated without isolation (a leak
    would give about 1; isolation gives float rounding).
    """
    was_training = model.training
    model.eval()  # no dropout: the three passes must differ only in how the samples are joined
    try:
        return _isolation_ratio(model)
    finally:
        model.train(was_training)


def _isolation_ratio(model) -> float:
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().weight.shape[0]
    first = torch.arange(3, 10, device=device) % vocab
    second = torch.arange(11, 16, device=device) % vocab
    decoder = model.get_decoder()

    def hidden(ids, positions):
        return decoder(input_ids=ids[None], position_ids=positions[None], attention_mask=None,
                       use_cache=False).last_hidden_state[0].float()

    ids = torch.cat([first, second])
    alone = hidden(second, torch.arange(len(second), device=device))
    packed = hidden(ids, torch.cat([torch.arange(len(first), device=device),
                                    torch.arange(len(second), device=device)]))[len(first):]
    leaked = hidden(ids, torch.arange(len(ids), device=device))[len(first):]
    error = float((packed - alone).abs().max())
    leak = float((leaked - alone).abs().max())
    ratio = error / max(leak, 1e-12)
    # A leak makes the packed states the leaked ones (ratio ~1); bf16 rounding across many
    # layers stays far below a tenth of it, fp32 below 1e-5.
    if ratio > 0.1:
        raise ValueError(
            f"packing check failed for {type(model).__name__} with attention "
            f"{model.config._attn_implementation!r}: a packed sample's hidden states differ from "
            f"its own by {error:.3g} (a leak between samples moves them by {leak:.3g}); this "
            "model does not isolate packed samples, train it with --no-packing")
    return ratio
