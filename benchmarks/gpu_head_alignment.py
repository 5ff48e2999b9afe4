"""The blocked output head's forward + backward on a GPU, with vocabulary slices whose width is
or is not a multiple of 128 entries (bf16 rows 16-byte aligned or not), eager and compiled.

    python benchmarks/gpu_head_alignment.py            # Qwen2-0.5B and 1.5B head shapes, ~1 min

Prints one table row per (hidden size, slice width, kernels): median milliseconds of 20 timed
forward + backward passes after 3 warm-ups, and the slice width `head_blocks` picks now.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minorsft.logprobs import EAGER_HEAD, _BlockedHeadLogps, compiled_head, head_blocks


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_head(device: torch.device, hidden_size: int, positions: int, vocab: int, width: int,
              kernels, repeats: int = 20) -> float:
    torch.manual_seed(0)
    hidden = torch.randn(positions, hidden_size, device=device, dtype=torch.bfloat16,
                         requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device=device, dtype=torch.bfloat16) * 0.02
              ).requires_grad_()
    labels = torch.randint(0, vocab, (positions,), device=device)
    blocks = (positions, width)
    times = []
    for step in range(3 + repeats):
        synchronize(device)
        start = time.perf_counter()
        logps = _BlockedHeadLogps.apply(hidden, weight, None, labels, blocks, kernels)
        logps.sum().backward()
        synchronize(device)
        hidden.grad = weight.grad = None
        if step >= 3:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=2500)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", default="896,1536", help="hidden sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    picked = head_blocks(args.positions, args.vocab)[1]
    unaligned = min(args.vocab, max(1024, (1 << 24) // args.positions))  # 0.3.1's pick
    print(f"{args.positions} answer positions, vocabulary {args.vocab}, bf16; head_blocks "
          f"picks {picked} entries per slice (0.3.1 picked {unaligned})")
    print(f"| hidden | slice width | kernels | fwd+bwd ms (median of {args.repeats}) |")
    print("|---|---|---|---|")
    for hidden_size in map(int, args.hidden.split(",")):
        for width in sorted({unaligned, picked}):
            for name, kernels in (("eager", EAGER_HEAD), ("compiled", compiled_head())):
                ms = time_head(device, hidden_size, args.positions, args.vocab, width, kernels,
                               args.repeats)
                print(f"| {hidden_size} | {width} | {name} | {ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
