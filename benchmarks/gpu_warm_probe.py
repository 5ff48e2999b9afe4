"""Warm-shape probe on a GPU: where a packed MinorSFT step spends its time once lengths repeat.

Qwen2-0.5B shape from a config, bf16, 4 micro-batches of 8 rows (256-1024 tokens) run 3 times
over, the last pass timed (every length seen before). Lines:

- forward + backward: minorsft's packed SDPA in its two layouts (per-sample calls; one call on
  a padded gather), padded batches under SDPA, and an experiment with
  PyTorch's `torch.nn.attention.varlen.varlen_attn` (causal via `window_size=(-1, 0)`, GQA
  native or by repeating the key/value heads), with its largest log-prob difference to padding;
- the whole `train_step` with fused AdamW (minorsft's) and foreach, in pure bf16, and fused on
  fp32 master weights (minorsft's default for bf16 models);
- a torch profiler table of 4 whole steps (kernel launches and CPU time against GPU time).

On torch 2.11 (H200) the varlen experiment gave summed log-probs 0.45 nats away from padding,
first read as wrong values; `gpu_check.py` sections 1b and 1c later showed varlen equal to
per-sample flash attention and bf16 noise of that size between padded and packed batches, and
varlen became minorsft's CUDA layout (docs/performance.md, section 7). Run on a machine with
one GPU (PYTHONPATH=.):

    PYTHONPATH=. python benchmarks/gpu_warm_probe.py
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import QWEN2_05B, Trainer, build_model, make_rows, set_attention  # noqa: E402

import minorsft.packing as packing_module  # noqa: E402
from minorsft.packing import micro_batch_logps  # noqa: E402
from minorsft.train import linear_schedule  # noqa: E402

GQA = {"mode": "native"}


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     packed_lengths=None, **kwargs):
    from torch.nn.attention.varlen import varlen_attn

    bounds = [0, *itertools.accumulate(packed_lengths)]
    cu = torch.tensor(bounds, dtype=torch.int32).to(query.device, non_blocking=True)
    if GQA["mode"] == "repeat":
        key = repeat_kv(key, module.num_key_value_groups)
        value = repeat_kv(value, module.num_key_value_groups)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [L, heads, D]
    longest = max(packed_lengths)
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0))
    return out.unsqueeze(0), None


def main():
    print("torch", torch.__version__, flush=True)
    AttentionInterface.register("probe_varlen", varlen_attention)
    device = torch.device("cuda")
    model = build_model(QWEN2_05B, torch.bfloat16, device).train()
    rows = make_rows(8 * 4, 256, 1024, QWEN2_05B["vocab_size"], seed=3)
    batches = [rows[i:i + 8] for i in range(0, len(rows), 8)]

    def timed(name, step):
        try:
            times = []
            for _ in range(3):
                for rows_now in batches:
                    torch.cuda.synchronize()
                    started = time.perf_counter()
                    step(rows_now)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - started)
            print(f"{name:45s} warm median {statistics.median(times[-4:]):.4f}  "
                  f"first {times[0]:.3f}", flush=True)
        except Exception as error:  # an experiment may not run on this torch
            print(name, "FAILED", repr(error)[:400], flush=True)

    def forward_backward(packing):
        def step(rows_now):
            logps, _ = micro_batch_logps(model, rows_now, 0, device, packing)
            logps.sum().backward()
            model.zero_grad(set_to_none=True)
        return step

    set_attention(model, "segment/per-sample")
    timed("fwd+bwd packed, per-sample sdpa", forward_backward(True))
    set_attention(model, "segment/padded")
    timed("fwd+bwd packed, padded-layout sdpa", forward_backward(True))
    set_attention(model, "sdpa")
    timed("fwd+bwd padded sdpa", forward_backward(False))

    segment_name = packing_module.SEGMENT_ATTENTION
    packing_module.SEGMENT_ATTENTION = "probe_varlen"  # so that the lengths are passed to it
    model.set_attn_implementation("probe_varlen")
    got, _ = micro_batch_logps(model, batches[0], 0, device, True)
    set_attention(model, "sdpa")
    want, _ = micro_batch_logps(model, batches[0], 0, device, False)
    print("varlen native-gqa vs padded max diff", (got - want).abs().max().item(), flush=True)
    model.set_attn_implementation("probe_varlen")
    timed("fwd+bwd varlen native gqa", forward_backward(True))
    GQA["mode"] = "repeat"
    got, _ = micro_batch_logps(model, batches[0], 0, device, True)
    print("varlen repeat-gqa vs padded max diff", (got - want).abs().max().item(), flush=True)
    timed("fwd+bwd varlen repeat gqa", forward_backward(True))
    packing_module.SEGMENT_ATTENTION = segment_name

    set_attention(model, "segment")  # minorsft's default layout on this device
    trainer = Trainer(model, 8, True, master_weights=False)
    timed("train_step, fused AdamW, pure bf16", lambda r: trainer.step("minorsft", True, r))
    trainer.optimizer = torch.optim.AdamW(list(model.parameters()), lr=1e-5, foreach=True)
    trainer.state.optimizer = trainer.optimizer
    trainer.state.scheduler = linear_schedule(trainer.optimizer, 0, 10_000)
    timed("train_step, foreach AdamW, pure bf16", lambda r: trainer.step("minorsft", True, r))
    trainer = Trainer(model, 8, True)  # the default: fp32 master weights
    timed("train_step, fused AdamW, fp32 master weights",
          lambda r: trainer.step("minorsft", True, r))
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for rows_now in batches:
            trainer.step("minorsft", True, rows_now)
        torch.cuda.synchronize()
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
