"""Does the output head cost more on answer counts it has not met before? Its forward +
backward (`minorsft.logprobs.head_token_logps`, blocks as `train` picks them) over `--counts`
new answer counts, then over the same counts again, eager, compiled, and compiled with the
counts rounded up to multiples of 256 (`logprobs.POSITION_BUCKET`), each kind in a fresh
process (what one kind compiles, plans or tunes must not be warm for the next).

    python benchmarks/gpu_head_counts.py                  # Qwen2-0.5B's head, ~1 min on a GPU
    python benchmarks/gpu_head_counts.py --device cpu --vocab 8192 --hidden 64 --counts 6

Prints one row per kind: median milliseconds over the new counts and over the seen ones, and
the slowest new one. The counts are drawn from the range a batch of 8 rows of 256-1024 tokens
gives (3,000-4,300 answer positions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

from gpu_long_run import exit_on_sigterm

KINDS = {"eager": (False, 0), "compiled": (True, 0), "compiled, bucketed 256": (True, 256)}


def child(args) -> dict:
    import torch

    import minorsft.logprobs as logprobs

    compiled, bucket = KINDS[args.child]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device, dtype=dtype)
    model = SimpleNamespace(get_output_embeddings=lambda: head)
    if compiled:
        logprobs.use_compiled_head(model)
    logprobs.POSITION_BUCKET = bucket
    generator = torch.Generator().manual_seed(1)
    counts = torch.randperm(1300, generator=generator)[:args.counts] + 3000
    hidden = torch.randn(int(counts.max()), args.hidden, device=device, dtype=dtype)
    labels = torch.randint(0, args.vocab, (int(counts.max()),), device=device)

    def timed(count: int) -> float:
        h = hidden[:count].detach().requires_grad_()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        logprobs.head_token_logps(model, h, labels[:count]).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        head.weight.grad = None
        return (time.perf_counter() - started) * 1000

    first = timed(2999)  # compiles (where compiled); not counted
    new = [timed(int(c)) for c in counts]
    seen = [timed(int(c)) for c in counts]
    return {"first_ms": first, "new_ms": new, "seen_ms": seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--counts", type=int, default=30, help="new answer counts to time")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.stdout.write("\n" + json.dumps(child(args)) + "\n")
        return
    exit_on_sigterm()
    print(f"head {args.vocab} x {args.hidden}, {args.counts} new answer counts in 3,000-4,299, "
          f"then the same again; one fresh process per kind")
    print("| kind | first call ms | new counts ms (median) | slowest new ms | seen counts ms "
          "(median) |")
    print("|---|---|---|---|---|")
    for kind in KINDS:
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--device",
                               args.device, "--vocab", str(args.vocab), "--hidden",
                               str(args.hidden), "--counts", str(args.counts)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"| {kind} | failed: {proc.stderr.strip().splitlines()[-1:]} | | | |")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {kind} | {result['first_ms']:,.0f} | {statistics.median(result['new_ms']):.1f}"
              f" | {max(result['new_ms']):.1f} | {statistics.median(result['seen_ms']):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
