"""Small CPU probes behind figures quoted in the code and docs (not benchmarks with rounds).

    python benchmarks/cpu_probes.py optimizer
        one AdamW step over SmolLM2-135M's parameters: torch's default (for-each loop on a
        CPU), foreach and fused, 3 steps each, and clip_grad_norm_ (`minorsft/optim.py`);
    python benchmarks/cpu_probes.py layouts --cache ref.parquet [--batch 4]
        the packed attention's two layouts (`minorsft/attention.py`): torch operations per
        training step, then step times in ABBA order, in one process; run it once more under
        MALLOC_MMAP_THRESHOLD_=131072 with --peak per layout for the resident peaks;
    python benchmarks/cpu_probes.py rss-trace --cache ref.parquet [--live-ref]
        resident memory after each training step, split into anonymous and file-backed pages
        (/proc/self/smaps_rollup): where a live reference's weights sit (docs/performance.md).
    python benchmarks/cpu_probes.py pack
        host time of `packing.pack_batch` for 8 random samples of 256-1024 tokens (a third
        prompt), the work a GPU waits for before every step;
    python benchmarks/cpu_probes.py head [--dtype bfloat16] [--compiled]
        the output head's log-probs alone, forward and backward (`logprobs.head_token_logps`),
        1,500 answer positions at SmolLM2's shape (hidden 576, vocabulary 49,152), median of 5;
        --compiled: with the block arithmetic compiled, as `train --compile` runs it (with
        TORCH_LOGS=output_code, inductor prints the kernels it generated);
    python benchmarks/cpu_probes.py accuracy --data gsm64.jsonl
        fp32 answer log-probs of SmolLM2 (16 GSM8K rows, one padded batch) against the same
        hidden states through the head in float64: summed and per-token errors;

`ref.parquet`: a cache from `minorsft precompute` (the docs used the first 24 GSM8K rows).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from common import load_examples, peak_rss_mib, reset_peak_rss, with_live_reference


def probe_optimizer(args) -> None:
    from minorsft.models import DEFAULT_MODEL, load_model, resolve_model

    model = load_model(resolve_model(DEFAULT_MODEL), torch.float32, torch.device("cpu"))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for name, options in (("default", {}), ("foreach", {"foreach": True}),
                          ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-5, **options)
        optimizer.step()  # the moments exist from here on
        started = time.perf_counter()
        for _ in range(3):
            optimizer.step()
        step_s = (time.perf_counter() - started) / 3
        started = time.perf_counter()
        for _ in range(3):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        clip_s = (time.perf_counter() - started) / 3
        print(f"AdamW {name:8s} step {step_s:.3f} s   clip_grad_norm_ {clip_s:.3f} s")


def _train_state(cache: str, batch: int):
    from rich.console import Console

    from minorsft.cache import iter_rows
    from minorsft.train import TrainConfig, setup

    config = TrainConfig(cache=cache, output=tempfile.mkdtemp(prefix="probe-"),
                         loss="minorsft", lr=1e-5, batch_size=batch, micro_batch_size=batch,
                         max_steps=100, shuffle=False, warmup_ratio=0.0, dtype="float32",
                         device="cpu")
    state = setup(config, Console(stderr=True, quiet=True))
    rows = list(iter_rows(Path(cache)))
    return state, config, [rows[i:i + batch] for i in range(0, len(rows), batch)]


def probe_layouts(args) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    import minorsft.attention as attention
    from minorsft.train import train_step

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[str(func)] += 1
            return func(*args, **(kwargs or {}))

    state, config, batches = _train_state(args.cache, args.batch)
    if args.peak:  # one layout per process: the resident peak of its steps 2-3
        attention.LAYOUT_BY_DEVICE["cpu"] = args.peak
        train_step(state, config, batches[0])
        reset_peak_rss()
        for rows in batches[1:3]:
            train_step(state, config, rows)
        print(f"{args.peak}: peak {peak_rss_mib():,.0f} MiB over steps 2-3")
        return
    layouts = list(attention.LAYOUTS)
    for layout in layouts:
        attention.LAYOUT_BY_DEVICE["cpu"] = layout
        with CountOps() as counter:
            train_step(state, config, batches[0])
        print(f"{layout}: {sum(counter.counts.values())} torch operations per step")
    times = {layout: [] for layout in layouts}
    for index in range(8):
        layout = layouts[(index + index // 2) % 2]  # ABBA
        attention.LAYOUT_BY_DEVICE["cpu"] = layout
        started = time.perf_counter()
        train_step(state, config, batches[(index // 2) % len(batches)])
        times[layout].append(time.perf_counter() - started)
    for layout, seconds in times.items():
        print(f"{layout}: steps {' '.join(f'{s:.2f}' for s in seconds)} s, "
              f"median {sorted(seconds)[len(seconds) // 2]:.2f} s")


def _smaps(label: str) -> None:
    text = Path("/proc/self/smaps_rollup").read_text()

    def field(name):
        return int(re.search(name + r":\s+(\d+)", text).group(1)) / 1024

    rss, anonymous = field("Rss"), field("Anonymous")
    print(f"{label:26s} RSS {rss:7,.0f}  anonymous {anonymous:7,.0f}  file-backed "
          f"{rss - anonymous:6,.0f}  peak {peak_rss_mib():7,.0f} MiB", flush=True)


def probe_rss_trace(args) -> None:
    from minorsft.models import load_model
    from minorsft.train import train_step

    state, config, batches = _train_state(args.cache, args.batch)
    _smaps("after setup")
    reference = None
    if args.live_ref:
        reference = load_model(state.model_path, state.dtype, state.device).eval()
        reference.requires_grad_(False)
        _smaps("after reference load")
    for step, rows in enumerate(batches[:args.steps]):
        if reference is not None:
            rows = with_live_reference(reference, rows, state.tokenizer.pad_token_id,
                                       state.device)
        train_step(state, config, rows)
        _smaps(f"after step {step + 1}")


def probe_pack(args) -> None:
    import random

    from minorsft.packing import pack_batch

    generate = random.Random(0)
    lengths = [generate.randint(256, 1024) for _ in range(8)]
    input_ids = [[generate.randrange(150_000) for _ in range(n)] for n in lengths]
    answer_masks = [[t >= n // 3 for t in range(n)] for n in lengths]
    for _ in range(3):  # warm-up
        pack_batch(input_ids, answer_masks, torch.device("cpu"))
    rounds = 200
    started = time.perf_counter()
    for _ in range(rounds):
        pack_batch(input_ids, answer_masks, torch.device("cpu"))
    per_call = (time.perf_counter() - started) / rounds
    print(f"pack_batch, 8 samples, {sum(lengths)} tokens: {per_call * 1e3:.2f} ms per call "
          f"(mean of {rounds})")


def probe_head(args) -> None:
    from minorsft.logprobs import head_token_logps, use_compiled_head

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    positions, width, vocab = 1500, 576, 49_152

    class Head(torch.nn.Module):  # what head_token_logps needs of a model
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(width, vocab, bias=False).to(dtype)

        def get_output_embeddings(self):
            return self.head

    model = Head()
    if args.compiled:
        use_compiled_head(model)
    hidden = torch.randn(positions, width, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (positions,))
    times = []
    for _ in range(6):  # the first is warm-up
        hidden.grad = model.head.weight.grad = None
        started = time.perf_counter()
        head_token_logps(model, hidden, labels).sum().backward()
        times.append(time.perf_counter() - started)
    median = sorted(times[1:])[2]
    print(f"head log-probs, {positions} positions, hidden {width}, vocabulary {vocab}, "
          f"{args.dtype}{', compiled' if args.compiled else ''}: {median:.2f} s forward + "
          "backward (median of 5)")


def probe_accuracy(args) -> None:
    from minorsft.logprobs import answer_logps, pad_batch
    from minorsft.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model

    path = resolve_model(DEFAULT_MODEL)
    tokenizer = load_tokenizer(path)
    model = load_model(path, torch.float32, torch.device("cpu")).eval()
    examples = load_examples(args.data, tokenizer, 16, "question", "answer", None)
    input_ids, attention_mask, answer_mask = pad_batch(
        [e.input_ids for e in examples], [e.answer_mask for e in examples],
        tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        summed = answer_logps(model, input_ids, attention_mask, answer_mask)
        tokens, _ = answer_logps(model, input_ids, attention_mask, answer_mask,
                                 return_tokens=True)
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask
                                     ).last_hidden_state
        logits = hidden.double() @ model.get_output_embeddings().weight.double().t()
        exact = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    predicting = answer_mask[:, 1:]
    token_error = tokens.double() - exact[predicting]
    sum_error = summed.double() - (exact * predicting).sum(-1)
    print(f"{len(examples)} rows, {token_error.numel()} answer tokens, fp32 against a float64 "
          f"head: summed max abs error {sum_error.abs().max().item():.2e}; per token mean "
          f"{token_error.mean().item():+.2e}, mean abs {token_error.abs().mean().item():.2e}, "
          f"max abs {token_error.abs().max().item():.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("probe", choices=("optimizer", "layouts", "rss-trace", "pack", "head",
                                          "accuracy"))
    parser.add_argument("--cache", help="a minorsft cache (layouts, rss-trace)")
    parser.add_argument("--data", help="accuracy: GSM8K-style JSONL (question, answer)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--live-ref", action="store_true")
    parser.add_argument("--dtype", default="float32", help="head: float32 or bfloat16")
    parser.add_argument("--compiled", action="store_true", help="head: compiled block arithmetic")
    parser.add_argument("--peak", choices=("per-sample", "padded"),
                        help="layouts: measure this layout's resident peak instead")
    args = parser.parse_args()
    if args.probe in ("layouts", "rss-trace") and not args.cache:
        parser.error(f"{args.probe} needs --cache")
    if args.probe == "accuracy" and not args.data:
        parser.error("accuracy needs --data")
    {"optimizer": probe_optimizer, "layouts": probe_layouts,
     "rss-trace": probe_rss_trace, "pack": probe_pack, "head": probe_head,
     "accuracy": probe_accuracy}[args.probe](args)


if __name__ == "__main__":
    main()
