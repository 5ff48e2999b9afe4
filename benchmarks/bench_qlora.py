"""LoRA on the model as it is against QLoRA (`train --load-in-4bit`: LoRA on a 4-bit NF4 base):
peak memory, tokens/s and the loss of the same steps, each run in a fresh process. Usage:

    python benchmarks/bench_qlora.py --rows 64 --steps 8 --repeats 2
    python benchmarks/bench_qlora.py --layer-check   # the 4-bit layers' precision

Each configuration trains from its own cache, scored under the model it starts from (as
`precompute --load-in-4bit` does for QLoRA). Peak memory is the process's resident high-water
mark (benchmarks/common.py) over its whole life: model loading, the step-0 check and training;
"base weights" are the loaded model's parameters and buffers (4-bit ones as packed bytes). On a
CPU the process peak need not fall (bitsandbytes loads the weights before it quantizes them, and
its CPU kernels likely work on dequantized copies): the saving is the weights' resident size,
which on a GPU is what bounds the model that fits (not measured here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_data_arguments,
    emit,
    machine,
    peak_rss_mib,
    read_records,
    run_child,
    table,
)

CONFIGURATIONS = {  # name: train --load-in-4bit
    "LoRA, fp32 base": False,
    "QLoRA, 4-bit NF4 base (--load-in-4bit)": True,
}


def child(args) -> None:
    from rich.console import Console

    from minorsft.train import TrainConfig, run_train

    run_train(TrainConfig(cache=args.cache, output=args.output, batch_size=8,
                          micro_batch_size=4, max_steps=args.steps, lr=1e-4, warmup_ratio=0.0,
                          lora_r=16, load_in_4bit=args.load_in_4bit, device="cpu",
                          dtype="float32", overwrite=True), Console(quiet=True))
    peak = peak_rss_mib()  # (before the model is loaded again below)
    steps = [json.loads(line) for line in Path(args.output, "metrics.jsonl").read_text()
             .splitlines()]
    emit({"peak_mib": peak, "weights_mib": weights_mib(args),
          "tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps[1:]),
          "losses": [s["loss"] for s in steps]})


def weights_mib(args) -> float:
    """The base model's parameters and buffers as loaded for training (4-bit ones packed)."""
    import torch

    from minorsft.models import QUANTIZATION_4BIT, load_model, resolve_model

    model = load_model(resolve_model(args.model), torch.float32, torch.device("cpu"), "sdpa",
                       QUANTIZATION_4BIT if args.load_in_4bit else None)
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def layer_check(model_name: str) -> None:
    """How far each 4-bit layer of the first decoder layer computes from its dequantized
    weights' product, for a few input shapes (`--layer-check`)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as functional
    import torch

    from minorsft.models import QUANTIZATION_4BIT, load_model, resolve_model

    model = load_model(resolve_model(model_name), torch.float32, torch.device("cpu"), "sdpa",
                       QUANTIZATION_4BIT)
    torch.manual_seed(0)
    rows = []
    for name, layer in model.named_modules():
        if not (isinstance(layer, bnb.nn.Linear4bit) and ".layers.0." in name):
            continue
        weight = functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        for shape in [(1, 1), (1, 64), (4, 64)]:
            inputs = torch.randn(*shape, weight.shape[1])
            with torch.no_grad():
                error = (layer(inputs) - inputs @ weight.T).abs().max()
                scale = (inputs @ weight.T).abs().max()
            rows.append([name, f"{tuple(weight.shape)}", f"{shape}", f"{error / scale:.2e}"])
    print(f"{machine()}\n{model_name}: max |4-bit layer - x W_dequantized^T| / max |x "
          "W_dequantized^T|, float32 inputs\n")
    print(table(["layer", "weight", "input rows", "relative error"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser, rows=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layer-check", action="store_true",
                        help="only: how far the 4-bit layers compute from their dequantized "
                             "weights' product")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--cache")
    parser.add_argument("--output")
    parser.add_argument("--load-in-4bit", action="store_true")
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.layer_check:
        return layer_check(args.model)

    from rich.console import Console

    from minorsft.precompute import PrecomputeConfig, run_precompute

    results: dict[str, list[dict]] = {name: [] for name in CONFIGURATIONS}
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n"
                                for r in read_records(args.data, args.rows)))
        caches = {}
        for four_bit in (False, True):
            caches[four_bit] = str(Path(scratch) / f"ref-{int(four_bit)}.parquet")
            run_precompute(PrecomputeConfig(
                model=args.model, data=str(data), out=caches[four_bit],
                prompt_field=args.prompt_field, response_field=args.response_field,
                max_length=args.max_length, dtype="float32", device="cpu",
                load_in_4bit=four_bit, verify_sample=0), Console(quiet=True))
        for _ in range(args.repeats):
            for name, four_bit in CONFIGURATIONS.items():
                results[name].append(run_child(Path(__file__), [
                    "--child", "--cache", caches[four_bit], "--output",
                    str(Path(scratch) / "run"), "--steps", str(args.steps), "--model", args.model,
                    *(["--load-in-4bit"] if four_bit else [])]))
    print(f"{machine()}\n{args.model}, {args.rows} rows of {args.data}, batch 8 (micro-batch "
          f"4), {args.steps} steps, LoRA r=16 on all linear layers, fp32; {args.repeats} runs "
          "each, alternating, each in a fresh process\n")
    print(table(["configuration", "base weights MiB", "peak RSS MiB (runs)", "tokens/s "
                 "(median of steps after the first)", "loss at step 0 / last"], [
        [name, f"{runs[0]['weights_mib']:,.0f}",
         " / ".join(f"{run['peak_mib']:,.0f}" for run in runs),
         " / ".join(f"{run['tokens_per_s']:,.0f}" for run in runs),
         f"{runs[0]['losses'][0]:.4f} / {runs[0]['losses'][-1]:.4f}"]
        for name, runs in results.items()]))


if __name__ == "__main__":
    main()
