"""Warm-shape probe on a GPU: where a packed MinorSFT step spends its time once lengths repeat.

Qwen2-0.5B shape from a config, bf16, 4 micro-batches of 8 rows (256-1024 tokens) run 3 times
over, the last pass timed (every length seen before). Lines:

- forward + backward: minorsft's packed SDPA in its three layouts (per-sample calls; one call
  on a padded gather; PyTorch's varlen flash attention, minorsft's CUDA default), padded
  batches under SDPA, and the original experiment with PyTorch's
  `torch.nn.attention.varlen.varlen_attn` as a separate attention function (causal via
  `window_size=(-1, 0)`, GQA native or by repeating the key/value heads), with the largest
  log-prob difference of each varlen line to padding;
- the whole `train_step` with fused AdamW (minorsft's) and foreach, in pure bf16, and fused on
  fp32 master weights (minorsft's default for bf16 models);
- a torch profiler table of 4 whole steps (kernel launches and CPU time against GPU time).

Each line is tried on its own: one that fails prints FAILED and the probe goes on.

On torch 2.11 (H200) the varlen experiment gave summed log-probs 0.45 nats away from padding,
first read as wrong values; `gpu_check.py` sections 1b and 1c later showed varlen equal to
per-sample flash attention and bf16 noise of that size between padded and packed batches, and
varlen became minorsft's CUDA layout (docs/performance.md, section 7). Run on a machine with
one GPU (PYTHONPATH=.):

    PYTHONPATH=. python benchmarks/gpu_warm_probe.py
    PYTHONPATH=. python benchmarks/gpu_warm_probe.py --device cpu --small  # smoke test
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minorsft.attention  # noqa: E402
from minorsft.packing import micro_batch_logps  # noqa: E402

from gpu_check import (  # noqa: E402
    QWEN2_05B,
    SMALL,
    TRAIN_STEP,
    Device,
    Trainer,
    build_model,
    make_rows,
    set_attention,
)

GQA = {"mode": "native"}


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     **kwargs):
    """The probe's own varlen attention. The sample lengths come as packing gives them to any
    attention function: the `packed_sample_lengths` context (else from the position ids)."""
    from torch.nn.attention.varlen import varlen_attn

    lengths = (minorsft.attention._PACKED_LENGTHS.get()
               or minorsft.attention.lengths_from_positions(kwargs.get("position_ids"))
               or [query.shape[2]])
    bounds = [0, *itertools.accumulate(lengths)]
    cu = torch.tensor(bounds, dtype=torch.int32).to(query.device, non_blocking=True)
    grouped = {}
    if GQA["mode"] == "repeat":
        key = repeat_kv(key, module.num_key_value_groups)
        value = repeat_kv(value, module.num_key_value_groups)
    elif minorsft.attention._VARLEN_GQA_FLAG and key.shape[1] != query.shape[1]:
        grouped = {"enable_gqa": True}  # later torch versions refuse GQA without it
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [L, heads, D]
    longest = max(lengths)
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0),
                      **grouped)
    return out.unsqueeze(0), None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="toy sizes (CPU smoke test)")
    args = parser.parse_args()
    dev = Device(args.device)
    device = dev.device
    print("torch", torch.__version__, torch.cuda.get_device_name() if dev.cuda else "cpu",
          "| train step:", TRAIN_STEP, flush=True)
    AttentionInterface.register("probe_varlen", varlen_attention)
    sizes = SMALL if args.small else QWEN2_05B
    batch = 2 if args.small else 8
    min_len, max_len = (16, 48) if args.small else (256, 1024)
    dtype = torch.bfloat16 if dev.cuda else torch.float32
    model = build_model(sizes, dtype, device).train()
    rows = make_rows(batch * 4, min_len, max_len, sizes["vocab_size"], seed=3)
    batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]

    def attempt(name, action):
        """Run one probe; a failure prints and the next probe goes on."""
        try:
            action()
        except Exception as error:  # noqa: BLE001 - an experiment may not run on this torch
            print(f"{name:48s} FAILED {type(error).__name__}: {str(error)[:400]}", flush=True)
            model.zero_grad(set_to_none=True)

    def timed(name, step):
        def action():
            times = []
            for _ in range(3):
                for rows_now in batches:
                    dev.sync()
                    started = time.perf_counter()
                    step(rows_now)
                    dev.sync()
                    times.append(time.perf_counter() - started)
            print(f"{name:48s} warm median {statistics.median(times[-4:]):.4f}  "
                  f"first {times[0]:.3f}", flush=True)
        attempt(name, action)

    def forward_backward(packing):
        def step(rows_now):
            logps, _ = micro_batch_logps(model, rows_now, 0, device, packing)
            logps.sum().backward()
            model.zero_grad(set_to_none=True)
        return step

    want = []

    def padded_logps():
        set_attention(model, "sdpa")
        with torch.no_grad():
            want.append(micro_batch_logps(model, batches[0], 0, device, False)[0].float())

    def use(attention):
        if attention.startswith("segment"):
            set_attention(model, attention)
        else:  # the probe's own attention function, in no layout of minorsft's
            set_attention(model, "sdpa")
            model.set_attn_implementation(attention)

    def versus_padded(name):  # the model's current attention on packed rows vs padded SDPA
        def action():
            if not want:
                raise RuntimeError("no padded log-probs to compare with (that probe failed)")
            with torch.no_grad():
                got, _ = micro_batch_logps(model, batches[0], 0, device, True)
            print(f"{name} vs padded max diff", (got.float() - want[0]).abs().max().item(),
                  flush=True)
        attempt(f"{name} vs padded", action)

    set_attention(model, "segment/per-sample")
    timed("fwd+bwd packed, per-sample sdpa", forward_backward(True))
    set_attention(model, "segment/padded")
    timed("fwd+bwd packed, padded-layout sdpa", forward_backward(True))
    set_attention(model, "sdpa")
    timed("fwd+bwd padded sdpa", forward_backward(False))

    attempt("padded log-probs", padded_logps)
    for label, attention, gqa in (("minorsft varlen layout", "segment/varlen", "native"),
                                  ("probe varlen native gqa", "probe_varlen", "native"),
                                  ("probe varlen repeat gqa", "probe_varlen", "repeat")):
        GQA["mode"] = gqa
        use(attention)
        versus_padded(label)
        timed(f"fwd+bwd packed, {label}", forward_backward(True))

    set_attention(model, "segment")  # minorsft's default layout on this device
    trainer = None

    def pure_bf16_trainer():
        nonlocal trainer
        trainer = Trainer(model, batch, True, master_weights=False)

    def foreach_adamw():
        trainer.optimizer = torch.optim.AdamW(list(model.parameters()), lr=1e-5, foreach=True)
        if trainer.real:  # minorsft.train's step reads them from its state
            from minorsft.train import linear_schedule

            trainer.state.optimizer = trainer.optimizer
            trainer.state.scheduler = linear_schedule(trainer.optimizer, 0, 10_000)

    def master_trainer():
        nonlocal trainer
        trainer = Trainer(model, batch, True)  # the default: fp32 master weights

    def train_step(rows_now):
        trainer.step("minorsft", True, rows_now)

    attempt("pure bf16 trainer", pure_bf16_trainer)
    if trainer is not None:
        timed("train_step, fused AdamW, pure bf16", train_step)
        attempt("foreach AdamW", foreach_adamw)
        timed("train_step, foreach AdamW, pure bf16", train_step)
    attempt("fp32 master weights trainer", master_trainer)
    if trainer is not None:
        timed("train_step, fused AdamW, fp32 master weights", train_step)

    def profile():
        activities = [torch.profiler.ProfilerActivity.CPU]
        if dev.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
            for rows_now in batches:
                trainer.step("minorsft", True, rows_now)
            dev.sync()
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    if trainer is not None:
        attempt("profile of 4 steps", profile)


if __name__ == "__main__":
    main()
