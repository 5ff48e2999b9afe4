"""Packed-row attention on a GPU: which SDPA backend the per-sample calls should use.

Forward + backward of the summed answer log-probs of one micro-batch (8 rows of 256-1024
tokens, Qwen2-0.5B-shaped model from a config, bf16), 8 timed batches per line, batches no
earlier line has run unless it says otherwise (so, mostly new sequence lengths):

- padded SDPA (transformers' mask), then the same batches again (lengths seen before), and
  packed rows under transformers' dense block mask;
- packed rows under `minorsft.attention`'s per-sample SDPA: with every backend allowed (new
  lengths each batch, and the same batch again and again), with one backend at a time, and
  with minorsft's choice (cuDNN left out).

Each sample of a packed row is a new sequence length for the kernel; this shows what that
costs each backend. Run on a machine with one GPU (needs torch and transformers; PYTHONPATH=.):

    PYTHONPATH=. python benchmarks/gpu_packed_attention.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import QWEN2_05B, build_model, make_rows, set_attention  # noqa: E402

import minorsft.attention  # noqa: E402
from minorsft.packing import micro_batch_logps  # noqa: E402

ALL_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
MINORSFT_CHOICE = minorsft.attention._PER_SAMPLE_BACKENDS


def main():
    print("torch", torch.__version__, torch.cuda.get_device_name())
    device = torch.device("cuda")
    model = build_model(QWEN2_05B, torch.bfloat16, device).train()
    rows = make_rows(8 * 8 * 10, 256, 1024, QWEN2_05B["vocab_size"], seed=3)
    batches = [rows[i:i + 8] for i in range(0, len(rows), 8)]
    unused = iter(range(0, len(batches), 8))  # each line gets 8 batches no line has run yet

    def run(name, attention, packing, backends=ALL_BACKENDS, same_batch=False, first=None):
        first = next(unused) if first is None else first
        set_attention(model, attention)
        minorsft.attention._PER_SAMPLE_BACKENDS = backends  # what the per-sample calls may use
        times = []
        try:
            for i in range(8):
                rows_now = batches[first] if same_batch else batches[first + i]
                torch.cuda.synchronize()
                started = time.perf_counter()
                logps, _ = micro_batch_logps(model, rows_now, 0, device, packing)
                logps.sum().backward()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
                model.zero_grad(set_to_none=True)
        except RuntimeError as error:
            print(f"{name:40s} failed: {error}")
            return
        print(f"{name:40s} median {statistics.median(times[1:]):.3f} s   all "
              + " ".join(f"{t:.3f}" for t in times), flush=True)

    run("padded sdpa", "sdpa", False)
    run("per-sample, all backends", "segment", True)
    run("per-sample, all backends, same batch", "segment", True, same_batch=True)
    for backend in ALL_BACKENDS[:3]:
        run(f"per-sample, {backend} only", "segment", True, (backend,))
    run("per-sample, minorsft's choice", "segment", True, MINORSFT_CHOICE)
    run("padded sdpa, the first line's batches again", "sdpa", False, first=0)
    run("packed, dense block mask", "sdpa", True)
    minorsft.attention._PER_SAMPLE_BACKENDS = MINORSFT_CHOICE


if __name__ == "__main__":
    main()
