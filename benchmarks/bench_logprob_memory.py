"""Peak memory of the log-prob step with a 152k vocabulary: head blocks vs naive full logits.

A model is built from a config (no download): Qwen2-0.5B's vocabulary (151,936) and width
(896) with few layers, so the output head dominates as it does in real Qwen2 models. One step
is forward + backward of the summed answer log-probs of a batch:

- naive: `model(...).logits` ([B, T, V]) -> `sequence_logps` (log-softmax over all of it);
- chunked (the name predates the blocks): `minorsft.logprobs.answer_logps` (hidden states at
  answer positions only, the output head in vocabulary blocks with an online logsumexp,
  recomputed in backward);
- compiled (with `--methods naive,chunked,compiled`): the same blocks, each block's arithmetic
  through torch.compile as `train --compile` runs it (compiled in a warm-up step before
  measuring).

Each configuration runs in a fresh child; it builds the model, resets the resident high-water
mark, runs the step and reports how far the peak rose above the memory held before the step
(weights, and their gradient buffers, allocated beforehand: the same for both). With the head
`trained` everything is trained, and the [V, H] weight gradients of the head and of the
embeddings (produced in backward, then added to their buffers) are part of every step's rise.
With `frozen`, embeddings and output head are frozen, as with LoRA, and the rise is the
step's own activations. On a GPU (`--device cuda`) the same numbers come from
`torch.cuda.max_memory_allocated`. Usage:

    python benchmarks/bench_logprob_memory.py --batch 2 --length 1024
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import emit, machine, peak_rss_mib, reset_peak_rss, rss_mib, run_child, table

SCRIPT = Path(__file__).resolve()


def build_model(vocab: int, hidden: int, layers: int, dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from minorsft.logprobs import final_logit_transform

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(dtype=dtype, device=device)
    model.config.use_cache = False
    final_logit_transform(model)  # the head's one-off probe, as `train` runs it at start-up
    return model


def make_batch(batch: int, length: int, vocab: int, answer_share: float, device):
    """Random token ids; the last `answer_share` of each row is the answer."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    answer_mask = torch.zeros(batch, length, dtype=torch.bool)
    answer_mask[:, int(length * (1 - answer_share)):] = True
    return input_ids.to(device), attention_mask.to(device), answer_mask.to(device)


def step(model, method: str, tensors) -> torch.Tensor:
    from minorsft.logprobs import answer_logps, sequence_logps

    input_ids, attention_mask, answer_mask = tensors
    if method == "naive":
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logps = sequence_logps(logits, input_ids, answer_mask)
    else:
        logps = answer_logps(model, input_ids, attention_mask, answer_mask)
    logps.sum().backward()
    return logps.detach()


def child(args) -> dict:
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = build_model(args.vocab, args.hidden, args.layers, dtype, device)
    if args.head == "frozen":  # as with LoRA: neither vocabulary matrix is trained
        model.get_output_embeddings().weight.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(False)
    tensors = make_batch(args.batch, args.length, args.vocab, args.answer_share, device)
    if args.method == "compiled":  # compile before measuring; the warm-up's gradients go
        from minorsft.logprobs import use_compiled_head

        use_compiled_head(model)
        step(model, args.method, tensors)
        model.zero_grad(set_to_none=True)
    # Allocate the gradients first, so every method starts from the same held memory.
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        logps = step(model, args.method, tensors)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        before = rss_mib()
        if not reset_peak_rss():
            raise SystemExit("cannot reset the resident high-water mark on this system")
        logps = step(model, args.method, tensors)
        peak = peak_rss_mib()
    return {"before": before, "peak": peak, "rise": peak - before,
            "seconds": time.perf_counter() - started, "logps": logps.float().cpu().tolist()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--answer-share", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--heads", default="trained,frozen")
    parser.add_argument("--methods", default="naive,chunked",
                        help="naive and chunked, optionally compiled (needs a C++ compiler on "
                             "a CPU, Triton on a GPU)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--head", default="trained", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        emit(child(args))
        return

    shared = ["--child", "--vocab", str(args.vocab), "--hidden", str(args.hidden),
              "--layers", str(args.layers), "--batch", str(args.batch), "--length",
              str(args.length), "--answer-share", str(args.answer_share), "--device",
              args.device, "--dtype", args.dtype]
    rows = []
    for head in args.heads.split(","):
        results = {m: run_child(SCRIPT, [*shared, "--method", m, "--head", head])
                   for m in ["naive", *args.methods.replace("naive", "").split(",")] if m}
        for method, r in results.items():
            diff = max(abs(a - b) for a, b in zip(results["naive"]["logps"], r["logps"],
                                                  strict=True))
            rows.append([head, method, r["before"], r["peak"], r["rise"], r["seconds"],
                         r["rise"] / results["naive"]["rise"], f"{diff:.1e}"])
    tokens = args.batch * args.length
    print(f"\nLog-prob step (forward + backward), vocab {args.vocab}, hidden {args.hidden}, "
          f"{args.layers} layers, {args.batch} x {args.length} tokens ({args.answer_share:.0%} "
          f"answer), {args.dtype} on {args.device}\nnaive logits alone: {tokens} x "
          f"{args.vocab} x 4 B = {tokens * args.vocab * 4 / 2**20:.0f} MiB per fp32 copy\n"
          f"machine: {machine()}\n")
    unit = "allocated MiB" if args.device.startswith("cuda") else "RSS MiB"
    print(table(["vocab matrices (head, embeddings)", "method", f"before step ({unit})",
                 f"peak ({unit})", "rise over before", "seconds", "rise / naive rise",
                 "max abs logp diff"], rows))


if __name__ == "__main__":
    main()
