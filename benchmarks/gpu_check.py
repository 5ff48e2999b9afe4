"""One-GPU check of minorsft's performance claims, with models built from configs (no hub).

Sections (each prints a Markdown table; all go to <out>/gpu_check.md and .json):

1. correctness on this device: blocked-head ("chunked") and packed log-probs vs the naive
   full-logits formula (fp32, per-sample values and parameter gradients), eager and with
   compiled layers;
2. training step, bf16, eager layers (section 5 times compiling): raw SFT and MinorSFT packed
   as `minorsft train` packs them (minorsft's packed attention in the device's default layout)
   vs MinorSFT padded vs MinorSFT packed under transformers' dense block mask vs two layouts of
   the packed attention (per-sample calls; one call on a padded gather) vs MinorSFT with a live
   reference model beside the policy (tokens/s and
   `torch.cuda.max_memory_allocated`), steps interleaved in one process so that clock and
   thermal drift hit every configuration alike;
3. log-prob step peak memory with a 152k vocabulary: head blocks, named "chunked" in the
   tables (default block, 4 x, compiled blocks) vs naive full logits;
4. reference scoring: minorsft's engine (length-sorted token-budget batches, answer positions
   only, head in blocks, inference mode) vs a plain loop (fixed batches, full logits);
5. training throughput against TRL's SFTTrainer (only where `trl` imports): the same rows,
   batch, model shape and dtype, minorsft's default step (fp32 master weights), minorsft
   without master weights (pure bf16 AdamW, as TRL on a bf16 model) and minorsft
   `--dtype bf16-mixed` vs SFTTrainer's defaults on the bf16 model and SFTTrainer on fp32
   weights with its bf16 autocast (gradient checkpointing off in all); and minorsft with each
   packed layout, eager and compiled, compiled with a 4 x head block, and with compiled layers
   but eager head blocks (`--variants` picks; `trl-compile` adds TRL with
   `torch_compile=True`). With `--profile-steps N`, table 5p: N more seen-length steps of each
   trainer under torch's profiler (the GPU's busy share of the step, kernels launched per step,
   the costliest kernels): whether a step waits on the host or on arithmetic, and on which
   kernels.

Needs only torch, transformers and minorsft (`pip install --no-deps -e .` or PYTHONPATH=.).
`--device cpu --small` runs the same code at toy sizes (a smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import minorsft.attention
import minorsft.logprobs
from minorsft.attention import SEGMENT_ATTENTION, check_packed_isolation, use_segment_attention
from minorsft.compiling import compile_decoder_layers, compile_model, compiles_by_default
from minorsft.data import Example
from minorsft.engines.hf import token_budget_batches
from minorsft.logprobs import (
    answer_logps,
    final_logit_transform,
    pad_batch,
    sequence_logps,
    use_compiled_head,
)
from minorsft.loss import compute_loss
from minorsft.optim import make_optimizer
from minorsft.packing import micro_batch_logps

from common import with_live_reference

try:  # minorsft.train needs rich and pyarrow (for the cache), which a bare GPU box may lack
    from minorsft.distributed import AnswerLogpsModule, World
    from minorsft.train import TrainConfig, TrainState, linear_schedule, train_step

    TRAIN_STEP = "minorsft.train.train_step"
except ImportError:
    TRAIN_STEP = "local copy of train_step (minorsft.train not importable here)"

QWEN2_05B = dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864,
                 num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)
QWEN2_15B = dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960,
                 num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2)
SHAPES = {"0.5b": QWEN2_05B, "1.5b": QWEN2_15B}
SMALL = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


class Device:
    """Timing and peak memory on CUDA (allocator statistics) or CPU (wall clock only)."""

    def __init__(self, name: str):
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float:
        self.sync()
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else float("nan")

    def allocated_mib(self) -> float:
        self.sync()
        return torch.cuda.memory_allocated() / 2**20 if self.cuda else float("nan")


def start_profiler(dev: Device) -> torch.profiler.profile:
    """A started torch profiler recording host ops, and CUDA kernels where there is a GPU."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    dev.sync()
    profiler = torch.profiler.profile(activities=activities)
    profiler.start()
    return profiler


def profile_summary(profiler: torch.profiler.profile, dev: Device, steps: int,
                    seconds: float, top: int = 6) -> list:
    """Where `steps` profiled steps spent their `seconds`: one row of section 5p.

    GPU busy is the union of the kernels' intervals; the rest of the wall time the GPU waited
    for the host (launches, Python, synchronisation). A step bound by launches shows a busy
    share well below 1 and many kernels per step; a step bound by arithmetic shows its costliest
    kernels (matmuls, attention, the head's blocks).
    """
    dev.sync()
    profiler.stop()
    events = profiler.events()
    # A `record_function` range (the optimizer's "Optimizer.step#AdamW.step") is mirrored on
    # the GPU's timeline as a user annotation spanning its kernels and the gaps between them:
    # not a kernel. Counted as one (before the tenth session), it inflated the busy time and
    # topped the costliest kernels.
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)]
    host_ops = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU
                   and e.name.startswith("aten::"))
    intervals = sorted((k.time_range.start, k.time_range.end) for k in kernels)
    busy_us, reach = 0.0, float("-inf")
    for start, end in intervals:  # union of intervals (streams may overlap)
        busy_us += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    by_name: dict[str, float] = {}
    for k in kernels:
        by_name[k.name] = by_name.get(k.name, 0.0) + k.time_range.elapsed_us()
    total_us = sum(by_name.values()) or 1.0
    costliest = "; ".join(f"{name[:48]} {us / total_us:.0%}" for name, us in
                          sorted(by_name.items(), key=lambda item: -item[1])[:top])
    step_ms = 1e3 * seconds / steps
    busy_ms = busy_us / 1e3 / steps
    return [f"{step_ms:.1f}", f"{busy_ms:.1f}" if kernels else "n/a (CPU)",
            f"{busy_ms / step_ms:.2f}" if kernels else "", f"{len(kernels) / steps:,.0f}",
            f"{host_ops / steps:,.0f}", costliest]


DEFAULT_LAYOUTS = dict(minorsft.attention.LAYOUT_BY_DEVICE)


def set_attention(model, attention: str) -> None:
    """'segment': minorsft's attention for packed rows, in its default layout for the device;
    'segment/per-sample' or 'segment/padded': in that layout; else the implementation named."""
    layouts = minorsft.attention.LAYOUT_BY_DEVICE
    layouts.clear()
    layouts.update(DEFAULT_LAYOUTS)
    if attention.startswith("segment"):
        layout = attention.partition("/")[2]
        if layout:
            layouts[next(model.parameters()).device.type] = layout
        model.set_attn_implementation("sdpa")
        assert use_segment_attention(model)
    else:
        model.set_attn_implementation(attention)
    assert model.config._attn_implementation in (attention, SEGMENT_ATTENTION)


@contextlib.contextmanager
def logprobs_setting(name: str, value: int | None):
    """Inside the `with`, `minorsft.logprobs.<name>` is `value` (None: left as it is)."""
    before = getattr(minorsft.logprobs, name)
    setattr(minorsft.logprobs, name, value or before)
    try:
        yield
    finally:
        setattr(minorsft.logprobs, name, before)


def head_chunk_elements(elements: int | None):
    """Inside the `with`, the output head's blocks hold this many logits (None: the default)."""
    return logprobs_setting("LOGITS_CHUNK_ELEMENTS", elements)


def position_bucket(bucket: int | None):
    """Inside the `with`, answer positions go through the head in multiples of `bucket`."""
    return logprobs_setting("POSITION_BUCKET", bucket)


# The larger head chunk tried against the default (2**24 logits, 64 MiB in fp32): fewer chunks,
# so fewer launches, for 4 x the chunk's memory.
BIG_CHUNK = 1 << 26
# The `bucketed` variant: the default with answer positions rounded up to multiples of this.
POSITION_BUCKET = 256
BUCKETED_NAME = f"minorsft, answer positions in multiples of {POSITION_BUCKET}"
CPP_WRAPPER_NAME = "minorsft --compile, inductor's C++ wrapper"


def build_model(sizes: dict, dtype, device, attention="sdpa", seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**sizes, max_position_embeddings=8192, tie_word_embeddings=False,
                         pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype)
    model.set_attn_implementation(attention)
    model.config.use_cache = False
    final_logit_transform(model)  # the head's one-off probe, as `train` runs it at start-up
    return model


def make_rows(count: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """Cache-like rows: random ids, a prompt of ~1/3 of the length, the rest answer."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        prompt = max(1, length // 3)
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        mask = [False] * prompt + [True] * (length - prompt)
        rows.append({"id": str(i), "input_ids": ids, "answer_mask": mask,
                     "num_tokens": length - prompt,
                     "ref_logps": -2.0 * (length - prompt)})
    return rows


def section_correctness(dev: Device, small: dict) -> list[list]:
    model = build_model(small, torch.float32, dev.device, seed=1).train()
    rows = make_rows(6, 8, 40, small["vocab_size"], seed=2)
    weights = torch.linspace(-1, 2, len(rows), device=dev.device)

    def grads(logps):
        model.zero_grad(set_to_none=True)
        (logps * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    ids, attn, mask = pad_batch([r["input_ids"] for r in rows], [r["answer_mask"] for r in rows],
                                0, dev.device)
    naive = sequence_logps(model(input_ids=ids, attention_mask=attn).logits, ids, mask)
    naive_grads = grads(naive)
    out = []
    for name, packing, attention in (("chunked, padded", False, "sdpa"),
                                     ("chunked, packed, dense mask", True, "sdpa"),
                                     ("chunked, packed, per-sample sdpa", True,
                                      "segment/per-sample"),
                                     ("chunked, packed, padded-layout sdpa", True,
                                      "segment/padded")):
        set_attention(model, attention)
        logps, _ = micro_batch_logps(model, rows, 0, dev.device, packing)
        got_grads = grads(logps)
        value_diff = (logps - naive).abs().max().item()
        grad_diff = max((a - b).abs().max().item() for a, b in zip(got_grads, naive_grads,
                                                                    strict=True))
        ok = value_diff < 1e-3 and grad_diff < 1e-3
        out.append([name, f"{value_diff:.2e}", f"{grad_diff:.2e}", "ok" if ok else "MISMATCH"])
    # --compile: the same packed step through compiled decoder layers (Triton kernels on a GPU)
    name = "chunked, packed, per-sample sdpa, compiled layers and head blocks (--compile)"
    try:
        compiled = copy.deepcopy(model)
        set_attention(compiled, "segment/per-sample")
        compile_model(compiled)
        logps, _ = micro_batch_logps(compiled, rows, 0, dev.device, True)
        compiled.zero_grad(set_to_none=True)
        (logps * weights).sum().backward()
        got_grads = [p.grad.clone() for p in compiled.parameters()]
    except Exception as error:  # noqa: BLE001 - reported in the table, the check goes on
        out.append([name, "n/a", "n/a", f"FAILED: {type(error).__name__}: {error}"[:200]])
        return out
    value_diff = (logps - naive).abs().max().item()
    grad_diff = max((a - b).abs().max().item() for a, b in zip(got_grads, naive_grads,
                                                                strict=True))
    ok = value_diff < 1e-3 and grad_diff < 1e-3
    out.append([name, f"{value_diff:.2e}", f"{grad_diff:.2e}", "ok" if ok else "MISMATCH"])
    return out


def section_attention(dev: Device, sizes: dict, lengths_range: tuple[int, int]) -> list[list]:
    """One attention layer over a packed row of 8 samples, each packed layout in bf16 (and fp16
    for varlen), against per-sample attention in fp32: outputs and the gradients of q, k, v.

    bf16 rounding sets the scale; per-sample bf16 attention (flash on a GPU) is the yardstick a
    layout has to match. A layout that let samples see each other, or dropped the causal mask,
    would be off by about the size of the outputs themselves (order 1e-1 here).
    """
    heads, groups = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    dim = sizes["hidden_size"] // heads
    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(*lengths_range, (8,), generator=gen).tolist()
    total = sum(lengths)
    q = torch.randn(1, heads, total, dim, generator=gen)
    k, v = (torch.randn(1, groups, total, dim, generator=gen) for _ in range(2))
    grad = torch.randn(1, total, heads, dim, generator=gen)
    module = SimpleNamespace(num_key_value_groups=heads // groups, is_causal=True, training=True)
    device_type = dev.device.type

    def run(layout, dtype):
        minorsft.attention.LAYOUT_BY_DEVICE[device_type] = layout
        leaves = [t.to(dev.device, dtype).detach().requires_grad_() for t in (q, k, v)]
        with minorsft.attention.packed_sample_lengths(lengths):
            out, _ = minorsft.attention.segment_sdpa_attention(module, *leaves, None,
                                                               scaling=dim ** -0.5)
        out.backward(grad.to(dev.device, dtype))
        ran = layout
        if layout == "varlen" and not minorsft.attention.varlen_supported(leaves[0]):
            ran = "per-sample (varlen unsupported here)"
        return ran, [out.float()] + [t.grad.float() for t in leaves]

    try:
        _, want = run("per-sample", torch.float32)
        rows = []
        for layout, dtype in (("per-sample", torch.bfloat16), ("padded", torch.bfloat16),
                              ("varlen", torch.bfloat16), ("varlen", torch.float16),
                              ("per-sample", torch.float16)):
            ran, got = run(layout, dtype)
            diffs = [(a - b).abs().max().item() for a, b in zip(got, want, strict=True)]
            rows.append([f"{layout} ({ran})" if ran != layout else layout, str(dtype)]
                        + [f"{d:.2e}" for d in diffs])
    finally:
        minorsft.attention.LAYOUT_BY_DEVICE.clear()
        minorsft.attention.LAYOUT_BY_DEVICE.update(DEFAULT_LAYOUTS)
    rows.append(["scale: max abs of the fp32 values", "", *(f"{t.abs().max().item():.2e}"
                                                             for t in want)])
    return rows


def section_model_bf16(dev: Device, sizes: dict, lengths_range: tuple[int, int], dtype
                       ) -> list[list]:
    """A 2-layer model of the check's shape, in the check's dtype: packed log-probs and parameter
    gradients of each layout, eager and compiled, against eager per-sample attention; padded
    batches (transformers' SDPA with a mask, other kernels) show the dtype's rounding noise."""
    small = dict(sizes, num_hidden_layers=2)
    base = build_model(small, dtype, dev.device, seed=11).train()
    rows = make_rows(8, *lengths_range, small["vocab_size"], seed=13)
    weights = torch.linspace(-1, 2, len(rows), device=dev.device)

    def measure(attention, packing, compiled):
        model = copy.deepcopy(base)
        set_attention(model, attention)
        if compiled:
            compile_model(model)
        logps, _ = micro_batch_logps(model, rows, 0, dev.device, packing)
        (logps * weights).sum().backward()
        return logps.detach().float(), [p.grad.float() for p in model.parameters()]

    want_logps, want_grads = measure("segment/per-sample", True, False)
    grad_scale = max(g.abs().max().item() for g in want_grads)
    out = []
    for name, attention, packing, compiled in (
            ("padded batch, transformers' SDPA + mask", "sdpa", False, False),
            ("packed, varlen", "segment/varlen", True, False),
            ("packed, padded-gather", "segment/padded", True, False),
            ("packed, per-sample, compiled", "segment/per-sample", True, True),
            ("packed, varlen, compiled", "segment/varlen", True, True)):
        try:
            logps, grads = measure(attention, packing, compiled)
        except Exception as error:  # noqa: BLE001 - reported in the table, the check goes on
            out.append([name, f"FAILED: {type(error).__name__}: {error}"[:200], "", ""])
            continue
        grad_diff = max((a - b).abs().max().item() for a, b in zip(grads, want_grads,
                                                                    strict=True))
        out.append([name, f"{(logps - want_logps).abs().max().item():.3g}",
                    f"{grad_diff:.3g}", f"{grad_diff / grad_scale:.2e}"])
    out.append(["scale: summed log-probs, largest gradient", f"{want_logps.abs().max():.4g}",
                f"{grad_scale:.3g}", ""])
    minorsft.attention.LAYOUT_BY_DEVICE.clear()
    minorsft.attention.LAYOUT_BY_DEVICE.update(DEFAULT_LAYOUTS)
    return out


class Trainer:
    """One optimizer step as `minorsft.train.train_step` takes it, or a faithful copy of it.

    The copy (used only where minorsft.train cannot be imported) is the same computation:
    micro_batch_logps -> compute_loss -> (sum / count).backward -> clip 1.0 -> minorsft's
    AdamW step (`minorsft.optim.make_optimizer`).
    """

    def __init__(self, model, batch: int, use_train_module: bool, lr: float = 1e-5,
                 master_weights: bool = True, autocast: torch.dtype | None = None):
        self.model, self.batch, self.autocast = model, batch, autocast
        self.device = next(model.parameters()).device
        self.real = use_train_module and TRAIN_STEP.startswith("minorsft")
        params = [p for p in model.parameters() if p.requires_grad]
        # minorsft's optimizer: fused AdamW, on fp32 master weights of a bf16 model by default
        self.optimizer = make_optimizer(params, lr, master_weights=master_weights)
        if self.real:
            self.state = TrainState(
                model=model, policy=AnswerLogpsModule(model), world=World(),
                tokenizer=SimpleNamespace(pad_token_id=0),
                optimizer=self.optimizer, scheduler=linear_schedule(self.optimizer, 0, 10_000),
                device=self.device, dtype=next(model.parameters()).dtype, total_steps=10_000,
                metadata={}, model_path="(built from config)", packing=False,
                autocast=autocast)

    def step(self, loss: str, packing: bool, rows: list[dict]) -> dict:
        if self.real:
            self.state.packing = packing
            config = TrainConfig(cache="-", output="-", loss=loss, batch_size=self.batch,
                                 micro_batch_size=self.batch, packing=packing)
            return train_step(self.state, config, rows)
        ref = torch.tensor([r["ref_logps"] for r in rows], device=self.device)
        num = torch.tensor([r["num_tokens"] for r in rows], device=self.device)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            logps, tokens = micro_batch_logps(self.model, rows, 0, self.device, packing)
            out = compute_loss(loss, logps, ref, num, 0.04)
        (out.losses.sum() / len(rows)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"tokens": tokens, "loss": out.losses.detach().mean().item()}


def section_training(dev: Device, sizes: dict, batch: int, min_len: int, max_len: int,
                     steps: int, dtype, use_train_module: bool) -> tuple[list[list], dict]:
    model = build_model(sizes, dtype, dev.device).train()
    set_attention(model, "segment")
    isolation = check_packed_isolation(model)  # as `minorsft train` checks it, in this dtype
    trainer = Trainer(model, batch, use_train_module)
    rows = make_rows(batch * (steps + 2), min_len, max_len, sizes["vocab_size"], seed=3)
    batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]
    configs = {"sft": ("sft", True, "segment"), "minorsft": ("minorsft", True, "segment"),
               "minorsft padded": ("minorsft", False, "sdpa"),
               "minorsft packed, dense mask": ("minorsft", True, "sdpa"),
               # the two layouts of minorsft's packed attention (one is the default above)
               "minorsft packed, per-sample layout": ("minorsft", True, "segment/per-sample"),
               "minorsft packed, padded layout": ("minorsft", True, "segment/padded")}
    live_name = "minorsft + live reference"
    times = {name: [] for name in [*configs, live_name]}
    tokens = {name: [] for name in times}
    peaks = {name: [] for name in times}

    def run(name, loss, packing, attention, step_rows, reference=None):
        set_attention(model, attention)
        dev.reset_peak()
        started = time.perf_counter()
        if reference is not None:
            step_rows = with_live_reference(reference, step_rows, 0, dev.device)
        metrics = trainer.step(loss, packing, step_rows)
        dev.sync()
        times[name].append(time.perf_counter() - started)
        tokens[name].append(metrics["tokens"])
        peaks[name].append(dev.peak_mib())

    # Warm-up: optimizer states exist after the first step, kernels are chosen.
    for _, packing, attention in configs.values():
        set_attention(model, attention)
        trainer.step("minorsft", packing, batches[0])
    names = list(configs)
    for step in range(steps):  # interleaved, alternating order (ABC CBA ...)
        for name in names if step % 2 == 0 else names[::-1]:
            run(name, *configs[name], batches[1 + step])
    # The live reference last: while it exists its weights count in every peak.
    reference = build_model(sizes, dtype, dev.device, seed=0).eval()
    reference.requires_grad_(False)
    for step in range(steps):
        run(live_name, "minorsft", True, "segment", batches[1 + step], reference)
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    out, summary = [], {}
    for name in times:
        rate = statistics.median(t / s for t, s in zip(tokens[name], times[name], strict=True))
        peak = max(peaks[name])  # nan on the CPU (no allocator statistics)
        summary[name] = {"tok_s": rate, "step_s": statistics.median(times[name]),
                         "peak_mib": peak}
        out.append([name, f"{statistics.median(times[name]):.3f}", f"{rate:,.0f}",
                    f"{peak:,.0f}"])
    summary["weights_mib"] = weights_mib
    summary["isolation"] = isolation
    return out, summary


def section_logprob_memory(dev: Device, sizes: dict, batch: int, length: int, dtype
                           ) -> list[list]:
    out = []
    for head in ("trained", "frozen"):
        rises = {}
        for method in ("naive", "chunked", "chunked, 4 x chunk", "chunked, compiled blocks"):
            model = build_model(sizes, dtype, dev.device).train()
            if head == "frozen":  # as with LoRA: neither vocabulary matrix is trained
                model.get_output_embeddings().weight.requires_grad_(False)
                model.get_input_embeddings().weight.requires_grad_(False)
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(0, sizes["vocab_size"], (batch, length), generator=gen)
            ids = ids.to(dev.device)
            attn = torch.ones_like(ids)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[:, length // 2:] = True
            if "compiled" in method:  # compile (and let Triton tune) outside the measurement
                use_compiled_head(model)
                answer_logps(model, ids, attn, mask).sum().backward()
            before = dev.allocated_mib()
            dev.reset_peak()
            started = time.perf_counter()
            with head_chunk_elements(BIG_CHUNK if "4 x" in method else None):
                if method == "naive":
                    logits = model(input_ids=ids, attention_mask=attn).logits
                    logps = sequence_logps(logits, ids, mask)
                    del logits
                else:
                    logps = answer_logps(model, ids, attn, mask)
                logps.sum().backward()
            seconds = time.perf_counter() - started
            rises[method] = dev.peak_mib() - before
            out.append([head, method, f"{before:,.0f}", f"{dev.peak_mib():,.0f}",
                        f"{rises[method]:,.0f}", f"{seconds:.3f}",
                        f"{rises[method] / rises['naive']:.3f}" if dev.cuda else "n/a"])
            del model, logps
            if dev.cuda:
                torch.cuda.empty_cache()
    return out


def section_scoring(dev: Device, sizes: dict, rows_count: int, min_len: int, max_len: int,
                    batch: int, budget: int, dtype, rounds: int) -> list[list]:
    model = build_model(sizes, dtype, dev.device).eval()
    rows = make_rows(rows_count, min_len, max_len, sizes["vocab_size"], seed=5)
    examples = [Example(r["id"], i, r["input_ids"], r["answer_mask"]) for i, r in enumerate(rows)]
    answer_tokens = sum(e.num_tokens for e in examples)

    def engine():
        scores = [0.0] * len(examples)
        with torch.inference_mode():
            for group in token_budget_batches(examples, budget):
                tensors = pad_batch([examples[i].input_ids for i in group],
                                    [examples[i].answer_mask for i in group], 0, dev.device)
                for i, v in zip(group, answer_logps(model, *tensors).tolist(), strict=True):
                    scores[i] = v
        return scores

    def plain():
        scores = []
        with torch.no_grad():
            for start in range(0, len(examples), batch):
                group = examples[start:start + batch]
                ids, attn, mask = pad_batch([e.input_ids for e in group],
                                            [e.answer_mask for e in group], 0, dev.device)
                logits = model(input_ids=ids, attention_mask=attn).logits
                scores += sequence_logps(logits, ids, mask).tolist()
        return scores

    engine(), plain()  # warm-up
    seconds = {"minorsft engine": [], "plain loop": []}
    peaks = {"minorsft engine": [], "plain loop": []}
    results = {}
    for _ in range(rounds):
        for name, fn in (("minorsft engine", engine), ("plain loop", plain)):
            dev.reset_peak()
            started = time.perf_counter()
            results[name] = fn()
            dev.sync()
            seconds[name].append(time.perf_counter() - started)
            peaks[name].append(dev.peak_mib())
    diff = max(abs(a - b) for a, b in zip(results["minorsft engine"], results["plain loop"],
                                          strict=True))
    base = answer_tokens / statistics.median(seconds["plain loop"])
    out = []
    for name in seconds:
        rate = answer_tokens / statistics.median(seconds[name])
        out.append([name, answer_tokens, f"{rate:,.0f}", f"{rate / base:.2f}",
                    f"{max(peaks[name]):,.0f}", f"{diff:.2e}"])
    return out


def _trl_tokenizer():
    """A stand-in tokenizer: the rows are token ids already, TRL only needs pad and eos."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                   pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def trl_in_order() -> bool:
    """Whether this TRL can read the rows in order (`train_sampling_strategy="sequential"`)."""
    from trl import SFTConfig

    return "train_sampling_strategy" in SFTConfig.__dataclass_fields__


def trl_dataset(rows: list[dict]):
    """The cache-like rows as TRL's already tokenized prompt-completion dataset (`input_ids` +
    `completion_mask`: completion-only loss)."""
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": r["input_ids"],
                               "completion_mask": [int(m) for m in r["answer_mask"]]}
                              for r in rows])


def sft_trainer(dev: Device, model, data, batch: int, max_len: int, bf16: bool, compiled: bool,
                max_steps: int):
    """TRL's SFTTrainer on `model` with its defaults except gradient checkpointing (off, as in
    minorsft), reading `data` in order where this TRL can, one batch per optimizer step."""
    import tempfile

    from trl import SFTConfig, SFTTrainer

    settings = dict(
        output_dir=tempfile.mkdtemp(prefix="gpu-check-trl-"),
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=max_steps,
        learning_rate=1e-5, warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=10**6, save_strategy="no", report_to="none",
        dataloader_num_workers=0, max_length=max_len, bf16=bf16, use_cpu=not dev.cuda,
        torch_compile=compiled,
        seed=0,
        gradient_checkpointing=False)  # TRL's default is on; minorsft's (and this step's) off
    if trl_in_order():
        settings["train_sampling_strategy"] = "sequential"  # the same batches as minorsft's
    return SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=data,
                      processing_class=_trl_tokenizer())


def section_trl(dev: Device, sizes: dict, batch: int, min_len: int, max_len: int, steps: int,
                dtype, use_train_module: bool, variants: list[str] | None = None,
                profile_steps: int = 0, progress=None, rounds: int = 1
                ) -> tuple[list[list], list[list], list[list]]:
    """minorsft's default MinorSFT step vs TRL SFTTrainer on the same rows and batches.

    TRL keeps its defaults except gradient checkpointing (its default is on, which costs a
    recomputation; minorsft's is off), so both do the same forward and backward work. On the
    bf16 model TRL's AdamW is pure bf16; minorsft runs with its default fp32 master weights and
    without them (the same update precision as TRL), and with each of the speed options a GPU
    has to decide on: the layout of the packed attention, compiled layers or eager ones, and a
    4 x larger output-head chunk (compiled). "default" is what `minorsft train` does on the
    device (on CUDA with Triton: varlen attention, compiled layers).

    The rows are the cache-like token rows of section 2, given to TRL as an already tokenized
    prompt-completion dataset (`input_ids` + `completion_mask`, completion-only loss) and read in
    order, so both see the same batches. Each trainer goes over the batches twice: on a GPU the
    first pass ("new shapes") includes what kernels spend on each new sequence length (cuDNN
    plans, allocator growth), the second ("seen shapes") is the steady state of a long run,
    where lengths repeat. The first step of the first pass is warm-up and not counted. What is
    kept per length lives as long as the process: only the first run of each trainer (TRL, and
    the first minorsft variant) meets its batches new, the later ones and later rounds have
    met them (`gpu_long_run.py` runs each trainer in a fresh process instead).

    With `rounds` > 1 the whole comparison (TRL, then each variant, each on a freshly built
    model) runs that many times over: a step bound by the host moves by +-15 % between machine
    starts and within a run (section 7d of docs/performance.md), so the ratio rows give each
    round's ratio of medians and their median, and the table's step times and tokens/s are
    medians over every round's steps.

    With `profile_steps`, each trainer then runs that many more steps (batches 1, 2, ... a third
    time) under torch's profiler in the last round, not counted in the timings: the second table
    returned has one `profile_summary` row per trainer (5p). The third has every counted step's
    seconds, by trainer, round and pass (5s).

    `progress(rows, profiles, done, total)`, if given, gets both tables so far after each run
    (a minorsft variant or a TRL trainer), so that a check cut off by its timeout keeps them.
    """
    from common import record_trl_steps

    rows = make_rows(batch * (steps + 1), min_len, max_len, sizes["vocab_size"], seed=5)
    batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]
    # name -> one (step seconds, step tokens, peak MiB) per finished round
    results: dict[str, list[tuple[list, list, float]]] = {}
    profiles = []
    profile_steps = min(profile_steps, len(batches) - 1)
    parts = (("new shapes", slice(1, len(batches))), ("seen shapes", slice(len(batches), None)))

    def rate(step_times, step_tokens) -> float:
        """Median of the steps' own tokens/s."""
        return statistics.median(t / s for t, s in zip(step_tokens, step_times, strict=True))

    def table_rows() -> list[list]:
        """Table 5 from the runs finished so far (ratios to the TRL runs that have finished)."""
        out = []
        for name, runs in results.items():
            for label, part in parts:
                step_times = [t for times, _, _ in runs for t in times[part]]
                step_tokens = [n for _, tokens, _ in runs for n in tokens[part]]
                out.append([f"{name}, {label}", len(step_times),
                            f"{statistics.median(step_times):.3f}",
                            f"{rate(step_times, step_tokens):,.0f}",
                            f"{max(peak for _, _, peak in runs):,.0f}",
                            f"{runs[0][0][0]:.1f}" if label == "new shapes" else ""])
        for name, runs in results.items():
            if name.startswith("trl"):
                continue
            baselines = [trl_mixed] if name == mixed_name else [trl_name]  # the same precision
            if name != mixed_name:
                baselines.append(trl_compiled)
            for baseline in baselines:
                if baseline not in results:  # not asked for, or not run yet
                    continue
                described = []
                for label, part in parts:
                    # round by round: both trainers' medians from the same machine period
                    ratios = [rate(ours[0][part], ours[1][part])
                              / rate(theirs[0][part], theirs[1][part])
                              for ours, theirs in zip(runs, results[baseline], strict=False)]
                    text = f"{label} {statistics.median(ratios):.2f}"
                    if len(ratios) > 1:
                        text += f" (rounds {', '.join(f'{r:.2f}' for r in ratios)})"
                    described.append(text)
                out.append([f"ratio {name.split(' (')[0]} / {baseline.split(' (')[0]}", "", "",
                            ", ".join(described), "", ""])
        return out

    def step_rows() -> list[list]:
        """Table 5s: every counted step's seconds."""
        return [[name, index + 1, label, " ".join(f"{t:.3f}" for t in times[part])]
                for name, runs in results.items()
                for index, (times, _, _) in enumerate(runs) for label, part in parts]

    def finished_run():
        if progress is not None:
            done = sum(len(runs) for runs in results.values())
            progress(table_rows(), profiles, done, total_runs)

    mixed_name = "minorsft --dtype bf16-mixed (fp32 weights, bf16 autocast)"
    # key: (name, master weights, weights dtype, autocast, compiled, packed layout, head chunk);
    # compiled None and layout "": as `minorsft train` decides for the device
    all_variants = {
        "default": ("minorsft (default: packed, fp32 master weights, compiled where `train` "
                    "compiles)", True, dtype, None, None, "", None),
        "no-compile": ("minorsft --no-compile", True, dtype, None, False, "", None),
        "no-master": ("minorsft --no-master-weights (as TRL: pure bf16 AdamW)", False, dtype,
                      None, None, "", None),
        "mixed": (mixed_name, True, torch.float32, torch.bfloat16, None, "", None),
        "per-sample": ("minorsft eager, per-sample layout", True, dtype, None, False,
                       "per-sample", None),
        "padded": ("minorsft eager, padded-gather layout", True, dtype, None, False, "padded",
                   None),
        "varlen": ("minorsft eager, varlen layout", True, dtype, None, False, "varlen", None),
        "compile-per-sample": ("minorsft --compile, per-sample layout", True, dtype, None, True,
                               "per-sample", None),
        "compile-padded": ("minorsft --compile, padded-gather layout", True, dtype, None, True,
                           "padded", None),
        "compile-varlen": ("minorsft --compile, varlen layout", True, dtype, None, True,
                           "varlen", None),
        "compile-chunk": ("minorsft --compile, 4 x head blocks", True, dtype, None, True, "",
                          BIG_CHUNK),
        "compile-layers": ("minorsft, compiled layers, eager head blocks", True, dtype, None,
                           "layers", "", None),
        "bucketed": (BUCKETED_NAME, True, dtype, None, None, "", None),
        "cpp-wrapper": (CPP_WRAPPER_NAME, True, dtype, None, True, "", None),
    }
    # TRL with transformers' `torch_compile=True` (the whole model through torch.compile): what
    # a TRL user who wants speed can switch on. Only on request: its compiling takes a while.
    trl_compiled = "trl SFTTrainer, torch_compile=True"
    chosen = variants or list(all_variants)
    with_trl_compiled = "trl-compile" in chosen
    chosen = [key for key in chosen if key != "trl-compile"]
    if unknown := set(chosen) - set(all_variants):
        raise SystemExit(f"unknown --variants {sorted(unknown)}; known: {list(all_variants)}")
    variants = {all_variants[key][0]: all_variants[key][1:] for key in chosen
                if key in all_variants}
    trl_name = "trl SFTTrainer" + ("" if trl_in_order() else " (shuffled: no sequential sampler)")
    trl_mixed = "trl SFTTrainer, fp32 weights, bf16=True (autocast)"
    # TRL on the model in the check's dtype with its bf16 default (pure bf16 on a bf16 model),
    # and on fp32 weights, where bf16=True is autocast: the counterpart of bf16-mixed.
    trl_runs = [(trl_name, dtype, dtype == torch.bfloat16, False),
                (trl_mixed, torch.float32, True, False)]
    if mixed_name not in variants:  # its TRL counterpart is only needed beside it
        trl_runs = trl_runs[:1]
    if with_trl_compiled:
        trl_runs.append((trl_compiled, dtype, dtype == torch.bfloat16, True))
    total_runs = rounds * (len(variants) + len(trl_runs))
    data = trl_dataset(rows)

    def run_trl(name, weights_dtype, bf16, compiled, profile_steps=0):
        model = build_model(sizes, weights_dtype, dev.device).train()
        sft = sft_trainer(dev, model, data, batch, max_len, bf16, compiled,
                          max_steps=2 * len(batches) + (profile_steps and 1 + profile_steps))
        trl_times, trl_tokens = record_trl_steps(sft, dev.sync)
        if profile_steps:  # steps 2L+1 ... 2L+P: batches 1 ... P a third time, as above
            sft.add_callback(trl_profiler(dev, 2 * len(batches) + 1, profile_steps,
                                         lambda row, name=name: profiles.append([name, *row])))
        dev.reset_peak()
        sft.train()
        timed = 2 * len(batches)
        results.setdefault(name, []).append((trl_times[:timed], trl_tokens[:timed],
                                             dev.peak_mib()))
        print(f"  {name}: done", flush=True)
        del model, sft
        if dev.cuda:
            torch.cuda.empty_cache()
        finished_run()

    def run_round(profile_steps):
        # TRL's plain run first: a check cut short by its timeout still has the baseline that
        # every ratio is taken against.
        run_trl(*trl_runs[0], profile_steps=profile_steps)
        for name, settings in variants.items():
            run_minorsft(name, *settings, profile_steps=profile_steps)
        for run in trl_runs[1:]:
            run_trl(*run, profile_steps=profile_steps)

    def run_minorsft(name, *settings, profile_steps):
        if name != CPP_WRAPPER_NAME:
            return measure_minorsft(name, *settings, profile_steps)
        # Inductor's C++ wrapper launches the compiled kernels from C++ instead of Python: less
        # host time per kernel, where a step is bound by the host. Compiled afresh under it (a
        # reset, or the code compiled for the other variants would be reused), and reset after.
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()
        try:
            with inductor_config.patch(cpp_wrapper=True):
                measure_minorsft(name, *settings, profile_steps)
        finally:
            torch._dynamo.reset()

    def measure_minorsft(name, master_weights, weights_dtype, autocast, compiled, layout, chunk,
                         profile_steps):
        model = build_model(sizes, weights_dtype, dev.device).train()
        # what `minorsft train` picks for an SDPA model, in the device's default layout or this
        set_attention(model, f"segment/{layout}" if layout else "segment")
        isolation = check_packed_isolation(model)  # in this layout and dtype, as `train` checks
        if compiled == "layers":  # without the compiled head: what compiling it adds
            compile_decoder_layers(model)
        elif compiled or (compiled is None and compiles_by_default(dev.device)):
            compile_model(model)
        trainer = Trainer(model, batch, use_train_module, master_weights=master_weights,
                          autocast=autocast)
        times, tokens = [], []
        dev.reset_peak()
        with head_chunk_elements(chunk), \
                position_bucket(POSITION_BUCKET if name == BUCKETED_NAME else None):
            for batch_rows in batches + batches:
                started = time.perf_counter()
                tokens.append(trainer.step("minorsft", True, batch_rows)["tokens"])
                dev.sync()
                times.append(time.perf_counter() - started)
            peak = dev.peak_mib()
            if profile_steps:
                profiler = start_profiler(dev)
                started = time.perf_counter()
                for batch_rows in batches[1:profile_steps + 1]:
                    trainer.step("minorsft", True, batch_rows)
                dev.sync()
                profiles.append([name, *profile_summary(profiler, dev, profile_steps,
                                                        time.perf_counter() - started)])
        results.setdefault(name, []).append((times, tokens, peak))
        print(f"  {name}: first step {times[0]:.1f} s, isolation check {isolation:.1e}",
              flush=True)
        del model, trainer
        if dev.cuda:
            torch.cuda.empty_cache()
        finished_run()

    for round_index in range(rounds):
        # profiled steps in the last round only: they are not timed, and cost time
        run_round(profile_steps if round_index == rounds - 1 else 0)
    return table_rows(), profiles, step_rows()


def trl_profiler(dev: Device, first: int, steps: int, report):
    """A TRL trainer callback that profiles optimizer steps `first` ... `first + steps - 1`
    (counted from 1) and hands their `profile_summary` row to `report`."""
    from transformers import TrainerCallback

    class TrlProfile(TrainerCallback):
        def __init__(self):
            self.profiler, self.started = None, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == first:
                self.profiler = start_profiler(dev)
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None and state.global_step == first + steps - 1:
                dev.sync()
                report(profile_summary(self.profiler, dev, steps,
                                       time.perf_counter() - self.started))
                self.profiler = None

    return TrlProfile()


def table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=".")
    parser.add_argument("--small", action="store_true", help="toy sizes (CPU smoke test)")
    parser.add_argument("--shape", choices=SHAPES, default="0.5b",
                        help="model shape (Qwen2-0.5B or Qwen2-1.5B, built from a config)")
    parser.add_argument("--sections",
                        default="correctness,attention,model_bf16,training,logprob_memory,"
                                "scoring,trl")
    parser.add_argument("--steps", type=int, default=None,
                        help="measured steps per configuration in sections 2 and 5 (default 6; "
                             "section 5 runs steps + 1 batches twice)")
    parser.add_argument("--variants", default="",
                        help="section 5's minorsft runs, comma-separated (default: all): "
                             "default,no-compile,no-master,mixed,per-sample,padded,varlen,"
                             "compile-per-sample,compile-padded,compile-varlen,compile-chunk,"
                             "compile-layers,bucketed,cpp-wrapper; and trl-compile (TRL with "
                             "torch_compile=True, only when named)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="section 5: profile this many more seen-length steps of each "
                             "trainer (table 5p: GPU busy time, kernels per step, the costliest "
                             "kernels)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="section 5: run the whole comparison this many times (fresh models "
                             "each round); the ratio rows give each round's ratio")
    parser.add_argument("--local-step", action="store_true",
                        help="use the local copy of train_step even if minorsft.train imports")
    args = parser.parse_args()
    dev = Device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if dev.cuda else torch.float32
    big = SMALL if args.small else SHAPES[args.shape]
    head_sizes = dict(big, num_hidden_layers=2)  # the vocabulary dominates
    if args.small:
        train_shape = dict(batch=2, min_len=16, max_len=48, steps=2)
        memory_shape = dict(batch=2, length=64)
        scoring_shape = dict(rows_count=16, min_len=16, max_len=64, batch=4, budget=256,
                             rounds=1)
    else:
        train_shape = dict(batch=8, min_len=256, max_len=1024, steps=6)
        memory_shape = dict(batch=4, length=2048)
        scoring_shape = dict(rows_count=256, min_len=128, max_len=1024, batch=8, budget=16384,
                             rounds=3)
    if args.steps:
        train_shape["steps"] = args.steps
    env = {"device": torch.cuda.get_device_name() if dev.cuda else "cpu",
           "torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "dtype": str(dtype), "model": big,
           "train_step": "local copy" if args.local_step else TRAIN_STEP}
    report = {"env": f"# minorsft gpu_check\n\n`{json.dumps(env)}`\n"}
    results = {"env": env}
    sections = args.sections.split(",")

    def write(name: str, text: str):
        """Replace the file whole (a timeout's kill mid-write leaves the previous version)."""
        part = out / f".{name}.part"
        part.write_text(text)
        part.replace(out / name)

    def emit(title, headers, rows, unfinished: str = ""):
        """Print a table and (re)write both result files with it; a table written again under
        the same title replaces its earlier version. `unfinished`: a partial table (a section
        still running, written so that a timeout keeps it), noted as such and not printed."""
        note = f"_Unfinished: {unfinished}; if nothing follows, the check stopped here._\n\n"
        text = f"## {title}\n\n{note if unfinished else ''}{table(headers, rows)}\n"
        if not unfinished:
            print(text, flush=True)
        report[title] = text
        results[title] = rows
        if unfinished:
            results["unfinished"] = f"{title}: {unfinished}"
        else:
            results.pop("unfinished", None)
        write("gpu_check.md", "\n".join(report.values()))
        write("gpu_check.json", json.dumps(results, indent=2, default=str))

    started = time.perf_counter()
    if "correctness" in sections:
        emit("1. chunked and packed log-probs vs naive (fp32, values and gradients)",
             ["path", "max abs logp diff", "max abs grad diff", "verdict"],
             section_correctness(dev, SMALL))
    if "attention" in sections:
        emit(f"1b. packed attention layouts vs fp32 per-sample attention (one layer, 8 samples "
             f"of {train_shape['min_len']}-{train_shape['max_len']} tokens)",
             ["layout", "dtype", "max abs out diff", "dq", "dk", "dv"],
             section_attention(dev, big, (train_shape["min_len"], train_shape["max_len"])))
    if "model_bf16" in sections:
        emit(f"1c. packed log-probs and gradients by layout, eager and compiled ({dtype}, a "
             f"2-layer model of the check's shape, 8 samples), against eager per-sample",
             ["path", "max abs logp diff", "max abs grad diff", "grad diff / largest grad"],
             section_model_bf16(dev, big, (train_shape["min_len"], train_shape["max_len"]),
                                dtype))
    if "training" in sections:
        rows, summary = section_training(dev, big, dtype=dtype,
                                         use_train_module=not args.local_step, **train_shape)
        sft, minor = summary["sft"], summary["minorsft"]
        padded, dense = summary["minorsft padded"], summary["minorsft packed, dense mask"]
        live = summary["minorsft + live reference"]
        rows.append(["ratios", f"minorsft/sft step {minor['step_s'] / sft['step_s']:.3f}",
                     f"minorsft/padded tok/s {minor['tok_s'] / padded['tok_s']:.2f}; "
                     f"dense mask/padded {dense['tok_s'] / padded['tok_s']:.2f}",
                     f"minorsft/sft peak {minor['peak_mib'] / sft['peak_mib']:.3f}; live-ref "
                     f"peak - cache peak {live['peak_mib'] - minor['peak_mib']:,.0f} MiB "
                     f"(weights {summary['weights_mib']:,.0f} MiB); packing isolation check "
                     f"{summary['isolation']:.1e} (leak: ~1, refused above 0.1)"])
        emit(f"2. training step ({dtype}, batch {train_shape['batch']}, lengths "
             f"{train_shape['min_len']}-{train_shape['max_len']}, {train_shape['steps']} steps "
             f"each, interleaved)",
             ["config", "median step s", "tokens/s (median of steps)", "peak allocated MiB"],
             rows)
    if "logprob_memory" in sections:
        emit(f"3. log-prob step peak memory, vocab {head_sizes['vocab_size']}, "
             f"{memory_shape['batch']} x {memory_shape['length']} tokens (half answer), {dtype}",
             ["vocab matrices", "method", "allocated before MiB", "peak MiB", "rise MiB",
              "seconds", "rise / naive rise"],
             section_logprob_memory(dev, head_sizes, dtype=dtype, **memory_shape))
    if "scoring" in sections:
        emit(f"4. reference scoring ({dtype}, {scoring_shape['rows_count']} rows of "
             f"{scoring_shape['min_len']}-{scoring_shape['max_len']} tokens)",
             ["method", "answer tokens", "answer tokens/s", "x plain", "peak allocated MiB",
              "max abs logp diff"],
             section_scoring(dev, big, dtype=dtype, **scoring_shape))
    if "trl" in sections:
        try:
            import trl  # noqa: F401
        except Exception as error:  # missing, or broken by the box's other packages
            print(f"section 5 skipped: trl does not import: {error!r}")
        else:
            def emit_trl(rows, profiles, unfinished=""):
                emit(f"5. training vs TRL SFTTrainer ({dtype}, batch {train_shape['batch']}, "
                     f"lengths {train_shape['min_len']}-{train_shape['max_len']}, same rows in "
                     f"order)",
                     ["trainer", "steps counted", "median step s", "tokens/s (median of steps)",
                      "peak allocated MiB", "first step s (not counted; compiles)"], rows,
                     unfinished)
                if profiles:
                    emit(f"5p. where a seen-length step goes ({args.profile_steps} steps per "
                         f"trainer under torch's profiler, after the timed ones)",
                         ["trainer", "step ms (profiled)", "GPU busy ms", "busy / step",
                          "kernels / step", "aten ops / step",
                          "costliest kernels (share of GPU time)"], profiles, unfinished)

            def progress(rows, profiles, done, total):
                if done < total:  # the last run's tables are emitted whole below
                    emit_trl(rows, profiles, f"{done} of {total} runs finished")

            rows, profiles, steps = section_trl(
                dev, big, dtype=dtype, use_train_module=not args.local_step,
                variants=args.variants.split(",") if args.variants else None,
                profile_steps=args.profile_steps, progress=progress, rounds=args.rounds,
                **train_shape)
            emit_trl(rows, profiles)
            emit("5s. every counted step of section 5, seconds",
                 ["trainer", "round", "lengths", "step seconds in order"], steps)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
