"""Packed-row attention on a GPU: which SDPA backend the per-sample calls should use.

Forward + backward of the summed answer log-probs of one micro-batch (8 rows of 256-1024
tokens, Qwen2-0.5B-shaped model from a config, bf16), 8 timed batches per line, batches no
earlier line has run unless it says otherwise (so, mostly new sequence lengths):

- padded SDPA (transformers' mask), then the same batches again (lengths seen before), and
  packed rows under transformers' dense block mask;
- packed rows under `minorsft.attention`'s per-sample SDPA (the per-sample layout, forced
  here: on CUDA minorsft's default layout is varlen, which calls no SDPA backend): with every
  backend allowed (new lengths each batch, and the same batch again and again), with one
  backend at a time, and with minorsft's choice (cuDNN left out, `_PACKED_BACKENDS`);
- packed rows in minorsft's default layout for the device (varlen flash attention on CUDA).

Each sample of a packed row is a new sequence length for the kernel; this shows what that
costs each backend. Run on a machine with one GPU (needs torch and transformers; PYTHONPATH=.):

    PYTHONPATH=. python benchmarks/gpu_packed_attention.py
    PYTHONPATH=. python benchmarks/gpu_packed_attention.py --device cpu --small  # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minorsft.attention  # noqa: E402
from minorsft.packing import micro_batch_logps  # noqa: E402

from gpu_check import (  # noqa: E402
    QWEN2_05B,
    SMALL,
    Device,
    build_model,
    make_rows,
    set_attention,
)

ALL_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
MINORSFT_CHOICE = minorsft.attention._PACKED_BACKENDS
PER_SAMPLE = "segment/per-sample"  # minorsft's attention, forced into the per-sample layout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true",
                        help="toy sizes, 2 batches per line (CPU smoke test)")
    args = parser.parse_args()
    dev = Device(args.device)
    device = dev.device
    print("torch", torch.__version__, torch.cuda.get_device_name() if dev.cuda else "cpu")
    sizes = SMALL if args.small else QWEN2_05B
    per_line, batch = (2, 2) if args.small else (8, 8)
    min_len, max_len = (16, 48) if args.small else (256, 1024)
    dtype = torch.bfloat16 if dev.cuda else torch.float32
    model = build_model(sizes, dtype, device).train()
    rows = make_rows(batch * per_line * 10, min_len, max_len, sizes["vocab_size"], seed=3)
    batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]
    unused = iter(range(0, len(batches), per_line))  # each line: batches no line has run yet

    def run(name, attention, packing, backends=ALL_BACKENDS, same_batch=False, first=None):
        first = next(unused) if first is None else first
        times = []
        try:
            set_attention(model, attention)  # also resets the layouts to the defaults
            minorsft.attention._PACKED_BACKENDS = backends  # what the per-sample calls may use
            for i in range(per_line):
                rows_now = batches[first] if same_batch else batches[first + i]
                dev.sync()
                started = time.perf_counter()
                logps, _ = micro_batch_logps(model, rows_now, 0, device, packing)
                logps.sum().backward()
                dev.sync()
                times.append(time.perf_counter() - started)
                model.zero_grad(set_to_none=True)
        except Exception as error:  # noqa: BLE001 - one line failing must not stop the others
            print(f"{name:48s} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
            model.zero_grad(set_to_none=True)
            return
        finally:
            minorsft.attention._PACKED_BACKENDS = MINORSFT_CHOICE
        print(f"{name:48s} median {statistics.median(times[1:]):.3f} s   all "
              + " ".join(f"{t:.3f}" for t in times), flush=True)

    try:
        run("padded sdpa", "sdpa", False)
        run("per-sample, all backends", PER_SAMPLE, True)
        run("per-sample, all backends, same batch", PER_SAMPLE, True, same_batch=True)
        for backend in ALL_BACKENDS[:3]:
            run(f"per-sample, {backend} only", PER_SAMPLE, True, (backend,))
        run("per-sample, minorsft's choice", PER_SAMPLE, True, MINORSFT_CHOICE)
        run("padded sdpa, the first line's batches again", "sdpa", False, first=0)
        run("packed, dense block mask", "sdpa", True)
        layout = minorsft.attention.layout_for(device)
        run(f"packed, minorsft's default layout ({layout})", "segment", True)
    finally:
        set_attention(model, "sdpa")  # the layouts back to the defaults
        minorsft.attention._PACKED_BACKENDS = MINORSFT_CHOICE


if __name__ == "__main__":
    main()
