"""LoRA adapters through peft (the optional extra `minorsft[lora]`).

LoRA trains low-rank updates B A beside frozen weights. peft initialises B to zero, so at step 0
the policy is exactly the reference model that wrote the cache: r = 0, m_theta = 0 and the
MinorSFT coefficient is 1/2 (2 sigmoid(0) = 1), as with full fine-tuning.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import torch

from minorsft.cache import readable_weights


def _peft():
    from minorsft.models import quiet_bitsandbytes

    quiet_bitsandbytes()  # (peft imports it where installed)
    try:
        import peft
    except ImportError as error:
        raise ValueError("LoRA needs peft: pip install 'minorsft[lora]'") from error
    return peft


def parse_target_modules(value: str) -> str | list[str]:
    """`all-linear` (every linear layer but the output head) or a comma-separated list."""
    value = value.strip()
    if value == "all-linear":
        return value
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise ValueError("--lora-target-modules is empty")
    if "lm_head" in names:
        raise ValueError("--lora-target-modules: lm_head is not supported (the blocked "
                         "log-probs use the output head's weight directly)")
    return names


def apply_lora(model, r: int, alpha: float, dropout: float, target_modules: str,
               merge: bool = False):
    """Wrap `model` with fresh LoRA adapters; only the adapters stay trainable.

    `merge`: the adapters will be merged into the weights (--merge-lora), which refuses an
    adapter on an input embedding that the model ties to its output head.
    """
    peft = _peft()
    targets = parse_target_modules(target_modules)
    _refuse_unmatched_targets(model, targets)
    if merge:
        _refuse_merging_a_tied_embedding(model, targets)
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
        task_type="CAUSAL_LM",
    )
    with _without_peft_deprecations():
        return peft.get_peft_model(model, config)


def _refuse_unmatched_targets(model, targets: str | list[str]) -> None:
    """A ValueError naming the --lora-target-modules that match no module of the model (as peft
    matches them: the name, or its last parts): peft adapted the others and said nothing of a
    mistyped one, or gave its own message without the option when none matched."""
    if isinstance(targets, str):  # (all-linear)
        return
    modules = list(model.named_modules())
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in modules
                     if isinstance(module, torch.nn.Linear)} - {"lm_head"})
    layers = f"its linear layers: {', '.join(linear) or 'none'} (or all-linear)"
    matched = {target: [module for name, module in modules
                        if name == target or name.endswith("." + target)] for target in targets}
    if unmatched := [target for target, found in matched.items() if not found]:
        raise ValueError(f"--lora-target-modules: {', '.join(unmatched)} "
                         f"{'matches' if len(unmatched) == 1 else 'match'} no module of "
                         f"the model; {layers}")
    # (peft's own message printed the whole block, one line per layer in it)
    if blocks := [target for target, found in matched.items()
                  if all(next(module.children(), None) is not None for module in found)]:
        kind = type(matched[blocks[0]][0]).__name__
        raise ValueError(f"--lora-target-modules: {', '.join(blocks)} names a block of layers "
                         f"({kind}), not a layer; {layers}")


@contextlib.contextmanager
def _without_peft_deprecations():
    """peft asks transformers' deprecated `is_gradient_checkpointing` (when it wraps a model and
    when it loads saved adapters): its warning is for peft's authors, not for the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield


def _refuse_merging_a_tied_embedding(model, targets: str | list[str]) -> None:
    """Refuse to merge adapters of `targets` (peft's target_modules) if one is an input
    embedding that `model` ties to its output head: training left the head as it was, and the
    merge would change it through the shared tensor."""
    tied = _tied_input_embedding(model)
    if tied is None or isinstance(targets, str):  # "all-linear" (or a regex): linear layers
        return
    if any(tied == name or tied.endswith("." + name) for name in targets):
        raise ValueError(
            f"--lora-target-modules {','.join(targets)} with --merge-lora: {tied} is tied to the "
            "output head (tie_word_embeddings), so merging its adapter would change the output "
            "head too, which training left as it was: the merged model would not be the trained "
            "one. Leave the embedding out, or keep the adapters unmerged")


def _tied_input_embedding(model) -> str | None:
    """The name of `model`'s input embedding if it shares its weight with the output head."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embedding.weight is not head.weight:
        return None
    return next(name for name, module in model.named_modules() if module is embedding)


def is_lora(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_lora(model, output: Path, merge: bool, tokenizer=None, state_dict: dict | None = None,
              base_path: str | None = None, dtype="auto",
              generation_config=None) -> Path | None:
    """Save the adapters in `output`; with `merge`, also a plain merged model in output/merged.

    The merged folder loads with transformers (and vLLM) without peft: it gets `tokenizer`
    (the one saved beside the adapters, chat template included) too. Merging folds the
    adapters into the base weights in place, so it is done last, after the adapters are saved.

    `state_dict` (the model's gathered weights) and `base_path`: for a model whose parameters
    are FSDP shards, which can neither be saved nor merged as they are; the merge then loads
    the base model from `base_path` on the CPU and the saved adapters onto it.
    `generation_config`: the run's, where it is not the base model's, saved beside the adapters.
    """
    model.save_pretrained(output, safe_serialization=True, state_dict=state_dict)
    readable_weights(output)
    # the run's stop tokens where they are not the base model's (chat_templates.
    # stop_at_end_of_turn), for a merge from the saved adapters, which loads the base's own
    if generation_config is not None:
        generation_config.save_pretrained(output)
    if not merge:
        return None
    if base_path is not None:
        return merge_saved_adapters(output, base_path, tokenizer, dtype)
    return _save_merged(model.merge_and_unload(), output, tokenizer)


def merge_saved_adapters(output: Path, base_path: str, tokenizer=None, dtype="auto") -> Path:
    """Merge the adapters saved in `output` into the base model read from `base_path` (on the
    CPU, in `dtype`: the dtype the run trained its weights in, as a merge at the end of
    training has it; "auto": the base's saved dtype), as a plain model in output/merged."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    if (output / "generation_config.json").exists():  # (runs before 0.5.0 have none)
        base.generation_config = GenerationConfig.from_pretrained(output)
    targets = _peft().PeftConfig.from_pretrained(output).target_modules
    _refuse_merging_a_tied_embedding(base, sorted(targets) if isinstance(targets, set)
                                     else targets)
    with _without_peft_deprecations():
        adapted = _peft().PeftModel.from_pretrained(base, output)
    return _save_merged(adapted.merge_and_unload(),
                        output, tokenizer)


def load_adapters(model, folder: str):
    """`model` with the saved adapters of `folder` on top, unmerged: the policy as it trained
    (merging folds them into weights of another precision, a 4-bit base's above all). Returns
    the model itself (its layers now peft's), which scores as any model does."""
    with _without_peft_deprecations():
        adapted = _peft().PeftModel.from_pretrained(model, folder, is_trainable=False)
    return adapted.get_base_model()


def _save_merged(merged, output: Path, tokenizer) -> Path:
    """Write the merged model whole under a hidden name, then rename it to output/merged: a
    merge killed part way leaves no `merged/` that looks finished (its config.json comes
    before the weights)."""
    merged_dir = output / "merged"
    staging = output / f".merged.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    merged.config.use_cache = True
    merged.save_pretrained(staging, safe_serialization=True)
    readable_weights(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    shutil.rmtree(merged_dir, ignore_errors=True)
    os.replace(staging, merged_dir)
    return merged_dir
