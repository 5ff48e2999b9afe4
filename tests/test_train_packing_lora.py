"""Packing and LoRA through the real trainer on the tiny model: same loss, same step-0 maths."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch

from minorsft.train import TrainConfig, run_train

from .conftest import build_tiny_model, build_tiny_tokenizer, demo_rows, precompute_rows


@pytest.fixture(scope="module")
def tiny_cache(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    return precompute_rows(str(tiny_model_dir), folder, demo_rows(3), max_batch_tokens=256)


def _train(cache, output, **overrides):
    settings = dict(cache=str(cache), output=str(output), batch_size=6, micro_batch_size=3,
                    max_steps=2, lr=1e-3, shuffle=False, warmup_ratio=0.0)
    settings.update(overrides)
    return run_train(TrainConfig(**settings))


def test_packed_training_equals_padded(tiny_cache, tmp_path):
    """Two steps: identical losses, gradient norms and log-probs, fewer tokens run.

    Packing is the default on this SDPA model (per-sample attention), so the default run is
    compared with an explicitly padded one.
    """
    padded = _train(tiny_cache, tmp_path / "padded", packing=False)
    packed = _train(tiny_cache, tmp_path / "packed")
    for a, b in zip(padded, packed, strict=True):
        for key in ("loss", "grad_norm", "policy_logps", "m_theta", "coefficient"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert b["tokens"] == a["tokens"]  # both count real (non-padding) tokens
    # The second step saw the first update: equal values there mean equal gradients too.
    assert padded[1]["m_theta"] != 0.0
    # The per-sample attention is a training-time choice: the saved model does not carry it.
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert "minorsft" not in json.dumps(config)


def test_lora_starts_at_the_reference_and_saves(tiny_cache, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    from rich.console import Console

    said = Console(record=True, width=400, file=io.StringIO())
    history = run_train(TrainConfig(
        cache=str(tiny_cache), output=str(out), batch_size=6, micro_batch_size=3, max_steps=2,
        lr=1e-3, shuffle=False, warmup_ratio=0.0, lora_r=4, lora_alpha=8, merge_lora=True,
        loss="minorsft"), console=said)
    # the start-up line says it is a LoRA run, and how much of the model trains
    trained = re.search(r"LoRA r=4 alpha=8 on all-linear: ([\d,]+) of ([\d,]+) parameters "
                        r"trained \(\d+\.\d\d %\), merged model saved at the end",
                        said.export_text())
    assert trained, said.export_text()
    from safetensors.torch import load_file

    adapters = load_file(out / "adapter_model.safetensors")
    assert int(trained[1].replace(",", "")) == sum(t.numel() for t in adapters.values())
    # B = 0 at initialisation: the policy is the reference, r = 0, coefficient sigmoid(0).
    assert abs(history[0]["m_theta"]) < 1e-5
    assert history[0]["coefficient"] == pytest.approx(0.5, abs=1e-6)
    assert abs(history[1]["m_theta"]) > 0  # the adapters did learn
    assert (out / "adapter_config.json").exists()
    assert (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert (out / "merged" / "config.json").exists()

    # The merged folder is a whole model: its tokenizer, chat template included, is there too,
    # so transformers, vLLM and `minorsft eval --model <out>/merged` load it as is.
    from transformers import AutoTokenizer

    from minorsft.models import load_tokenizer

    saved = AutoTokenizer.from_pretrained(out)
    merged_tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert merged_tokenizer.chat_template and merged_tokenizer.chat_template == saved.chat_template
    assert merged_tokenizer.get_vocab() == saved.get_vocab()
    assert load_tokenizer(str(out / "merged")).pad_token_id == saved.pad_token_id

    # The merged model computes what the adapter model computes.
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 14, 20, 2]])
    with torch.no_grad():
        adapter = AutoPeftModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(input_ids=ids).logits
    torch.testing.assert_close(adapter, merged, atol=1e-4, rtol=1e-4)


def test_lora_config_errors(tiny_cache, tmp_path):
    with pytest.raises(ValueError, match="merge-lora"):
        TrainConfig(cache=str(tiny_cache), output=str(tmp_path), merge_lora=True)
    # LoRA's other settings without --lora-r were ignored: every weight trained
    for setting, shown in ((dict(lora_alpha=8.0), "--lora-alpha 8.0"),
                           (dict(lora_dropout=0.1), "--lora-dropout 0.1"),
                           (dict(lora_target_modules="q_proj"), "--lora-target-modules q_proj")):
        with pytest.raises(ValueError, match=f"{shown}: LoRA settings apply with --lora-r > 0"):
            TrainConfig(cache=str(tiny_cache), output=str(tmp_path), **setting)
    TrainConfig(cache=str(tiny_cache), output=str(tmp_path), lora_r=4, lora_alpha=8.0)


def test_target_modules_that_match_nothing_are_named():
    """A mistyped name beside a good one was silently left out (peft adapted q_proj only)."""
    from minorsft.lora import apply_lora

    for targets in ("q_proj,foo", "foo_proj"):
        with pytest.raises(ValueError) as raised:
            apply_lora(build_tiny_model(build_tiny_tokenizer()), 4, 8.0, 0.0, targets)
        unmatched = targets.split(",")[-1]
        assert str(raised.value).startswith(
            f"--lora-target-modules: {unmatched} matches no module of the model; its linear "
            "layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")
    with pytest.raises(ValueError, match=r"--lora-target-modules: mlp names a block of layers "
                                         r"\(LlamaMLP\), not a layer; its linear layers: "):
        apply_lora(build_tiny_model(build_tiny_tokenizer()), 4, 8.0, 0.0, "q_proj,mlp")
    model = build_tiny_model(build_tiny_tokenizer())
    assert apply_lora(model, 4, 8.0, 0.0, "q_proj,self_attn.v_proj") is not None


def test_merging_an_adapter_on_a_tied_embedding_is_refused(tmp_path):
    """Merged into the tensor the output head shares, the embedding's adapter changed the head
    too, which training never did: the merged model was not the trained one (SmolLM2 ties)."""
    pytest.importorskip("peft")
    from .conftest import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    cache = precompute_rows(str(tmp_path / "tied"), tmp_path, demo_rows(2))
    lora = dict(lora_r=4, lora_target_modules="embed_tokens,q_proj")
    with pytest.raises(ValueError, match="model.embed_tokens is tied to the output head"):
        _train(cache, tmp_path / "merged", merge_lora=True, **lora)
    _train(cache, tmp_path / "unmerged", **lora)  # the adapters alone are what was trained
    with pytest.raises(ValueError, match="model.embed_tokens is tied to the output head"):
        _train(cache, tmp_path / "unmerged", merge_lora=True, resume=True, **lora)
    assert not (tmp_path / "unmerged" / "merged").exists()
    _train(cache, tmp_path / "attention", merge_lora=True, lora_r=4, lora_target_modules="q_proj")


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_trains_the_same_steps(tiny_cache, tmp_path, lora):
    """Recomputing the layers in backward changes memory, not the run (and, under the name
    this transformers has for it, warns about nothing)."""
    import warnings

    if lora:
        pytest.importorskip("peft")
    settings = dict(lora_r=4) if lora else {}
    plain = _train(tiny_cache, tmp_path / "plain", **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        recomputed = _train(tiny_cache, tmp_path / "recomputed", gradient_checkpointing=True,
                            **settings)
    for a, b in zip(plain, recomputed, strict=True):
        for key in ("loss", "grad_norm", "m_theta"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert plain[1]["m_theta"] != 0.0  # the second step saw the first update


def test_resume_merge_lora_merges_a_finished_run_trained_without_it(tiny_cache, tmp_path,
                                                                    monkeypatch):
    """It said "nothing to do" and wrote no merged model: the adapters had to be merged by
    hand with peft."""
    pytest.importorskip("peft")
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from minorsft.models import ModelError

    out = tmp_path / "lora"
    _train(tiny_cache, out, lora_r=4, lora_alpha=8)
    assert not (out / "merged").exists()
    # under torchrun only the first rank merges (each would load the whole base model)
    monkeypatch.setattr("minorsft.train.is_first_rank", lambda: False)
    assert _train(tiny_cache, out, lora_r=4, lora_alpha=8, merge_lora=True, resume=True) == []
    assert not (out / "merged").exists()
    monkeypatch.undo()
    # the base model's folder gone: one line saying so (it was transformers' OSError)
    run_config = json.loads((out / "run_config.json").read_text())
    moved = dict(run_config, model_path=str(tmp_path / "gone"))
    (out / "run_config.json").write_text(json.dumps(moved))
    from rich.console import Console

    from minorsft.train import _merge_finished_lora_run

    with pytest.raises(ModelError, match="gone: the model this run trained from is not there"):
        _merge_finished_lora_run(TrainConfig(cache=str(tiny_cache), output=str(out), lora_r=4,
                                             merge_lora=True, resume=True), moved,
                                 Console(quiet=True))
    (out / "run_config.json").write_text(json.dumps(run_config))
    (out / "merged").mkdir()  # what a merge killed before 0.4.1 left: a config, no weights
    (out / "merged" / "config.json").write_text("{}")
    said = Console(record=True, width=400, file=io.StringIO())
    assert run_train(TrainConfig(cache=str(tiny_cache), output=str(out), batch_size=6,
                                 micro_batch_size=3, max_steps=2, lr=1e-3, shuffle=False,
                                 warmup_ratio=0.0, lora_r=4, lora_alpha=8, merge_lora=True,
                                 resume=True), console=said) == []
    # it said "nothing to do" right after "merged ...", as if the merge had not happened
    text = said.export_text()
    assert "merged the finished run's adapters" in text
    assert "nothing left to train:" in text and "nothing to do" not in text
    ids = torch.tensor([[1, 5, 9, 14, 20, 2]])
    with torch.no_grad():
        adapter = AutoPeftModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()(input_ids=ids).logits
    torch.testing.assert_close(adapter, merged, atol=1e-4, rtol=1e-4)
    assert (out / "merged" / "tokenizer_config.json").exists()
    # weights readable as the umask allows, as config files are (safetensors wrote them 0600)
    import stat

    mode = stat.S_IMODE((out / "adapter_config.json").stat().st_mode)
    for weights in (out / "adapter_model.safetensors", out / "merged" / "model.safetensors"):
        assert stat.S_IMODE(weights.stat().st_mode) == mode, weights


def test_a_finished_bf16_run_merges_into_bf16_weights(tiny_cache, tmp_path):
    """The base read again from disk came in its saved dtype (fp32 here): a pure-bf16 run got
    an fp32 merged model after the fact, and a bf16 one when merged at the end of training."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    bf16 = dict(lora_r=4, dtype="bfloat16", step0_check=False)
    _train(tiny_cache, tmp_path / "at-the-end", merge_lora=True, **bf16)
    later = tmp_path / "later"
    _train(tiny_cache, later, **bf16)
    _train(tiny_cache, later, merge_lora=True, resume=True, **bf16)
    for run in (tmp_path / "at-the-end", later):
        weights = load_file(run / "merged" / "model.safetensors")
        assert {w.dtype for w in weights.values()} == {torch.bfloat16}, run


def test_peft_imports_bitsandbytes_without_its_kernels_warning():
    """peft imports bitsandbytes where it is installed, which on a CPU with bf16 instructions
    warned of a missing `kernels` package at every LoRA run. (Where bitsandbytes has nothing
    to say on this CPU, this passes either way.)"""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    code = ("from minorsft.lora import _peft; _peft(); import bitsandbytes, peft.tuners.lora; "
            "print('imported')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr
    assert "kernels" not in done.stderr, done.stderr


def test_adapters_are_scored_only_on_the_base_they_trained_on(tiny_model_dir, tmp_path,
                                                               monkeypatch):
    """eval (and a merge) put the adapters on whatever model the run's base path holds: a
    folder replaced since gave other numbers without a word. And adapters copied without the
    run's tokenizer are rendered with the template the run's cache was, not the base's own."""
    import shutil

    from minorsft.eval import EvalConfig, run_eval
    from minorsft.models import ModelError

    pytest.importorskip("peft")
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    rows = [{"id": f"r{n}", "prompt": f"{n} plus 1", "response": f"{n + 1}."} for n in range(6)]
    (tmp_path / "c").mkdir()
    cache = precompute_rows(str(base), tmp_path / "c", rows, chat_template="plain")
    run = tmp_path / "run"
    _train(cache, run, lora_r=4, lr=1e-2, batch_size=3, micro_batch_size=3)
    held = str(tmp_path / "c" / "sft.jsonl")
    whole = run_eval(EvalConfig(model=str(run), data=held))["heldout"]
    # the adapters alone (no tokenizer beside them): the cache's template, the same numbers
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "run_config.json"):
        shutil.copy(run / name, bare / name)
    assert run_eval(EvalConfig(model=str(bare), data=held))["heldout"] == whole
    # the tokenizer copied without its chat_template.jinja: the run's template all the same
    partial = tmp_path / "partial"
    shutil.copytree(run, partial, ignore=shutil.ignore_patterns("chat_template.jinja"))
    assert run_eval(EvalConfig(model=str(partial), data=held))["heldout"] == whole
    # a run as the base; adapters without their adapter_config.json: named as such
    with pytest.raises(ModelError, match=f"--base-model {run}: LoRA adapters, not the whole "
                                         "model adapters are put on; give the folder of the "
                                         "model the run trained from"):
        run_eval(EvalConfig(model=str(bare), data=held, base_model=str(run)))
    (bare / "adapter_config.json").rename(tmp_path / "adapter_config.json")
    with pytest.raises(ModelError, match="not a model folder .*holds LoRA adapter weights "
                                         "without their adapter_config.json"):
        run_eval(EvalConfig(model=str(bare), data=held))
    (tmp_path / "adapter_config.json").rename(bare / "adapter_config.json")
    # without run_config.json, nothing says how they trained: scored, and said
    from rich.console import Console

    (bare / "run_config.json").unlink()
    said = io.StringIO()
    run_eval(EvalConfig(model=str(bare), data=held), Console(file=said, width=400))
    assert ("no run_config.json beside them (not a `minorsft train` output, or copied without "
            "it), so nothing checks that this base, its precision (4-bit for QLoRA) and the "
            "chat template are those the adapters trained with") in " ".join(
                said.getvalue().split())
    # another model in the base's place: refused by eval and by a merge
    moved = tmp_path / "moved"
    shutil.move(base, moved)
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, seed=7).save_pretrained(base)
    tokenizer.save_pretrained(base)
    with pytest.raises(ModelError, match=f"{base}: not the model the LoRA run in {run} trained "
                                         "from .*put the run's base model back there"):
        run_eval(EvalConfig(model=str(run), data=held))
    with pytest.raises(ModelError, match="not the model the LoRA run"):
        _train(cache, run, lora_r=4, lr=1e-2, batch_size=3, micro_batch_size=3, resume=True,
               merge_lora=True)
    # the base moved: eval is told where it is now, and checks it is the same model; so is
    # a merge (the model in the old place is refused there too)
    assert run_eval(EvalConfig(model=str(run), data=held, base_model=str(moved)))[
        "heldout"] == whole
    lora = dict(lora_r=4, lr=1e-2, batch_size=3, micro_batch_size=3, resume=True,
                merge_lora=True)
    with pytest.raises(ModelError, match=f"{base}: not the model the LoRA run"):
        _train(cache, run, model=str(base), **lora)
    with pytest.raises(ModelError, match=r"--model \(with --resume --merge-lora\) .*: LoRA "
                                         "adapters, not the whole model adapters are put on"):
        _train(cache, run, model=str(run), **lora)
    _train(cache, run, model=str(moved), **lora)
    merged = run_eval(EvalConfig(model=str(run / "merged"), data=held))["heldout"]
    assert merged["nll_per_token"] == pytest.approx(whole["nll_per_token"], abs=1e-4)
    with pytest.raises(ModelError, match=f"{base}: not the model the LoRA run"):
        run_eval(EvalConfig(model=str(run), data=held, base_model=str(base)))
    with pytest.raises(ValueError, match="--base-model is where the base of LoRA adapters "
                                         f"given to --model is now, and --model {base} is a "
                                         "whole model"):
        run_eval(EvalConfig(model=str(base), data=held, base_model=str(moved)))
    # as --reference, its own option (m_theta of the run against itself: 0)
    with pytest.raises(ModelError, match="name where it is now with --reference-base-model"):
        run_eval(EvalConfig(model=str(run), reference=str(run), data=held,
                            base_model=str(moved)))
    against_itself = run_eval(EvalConfig(model=str(run), reference=str(run), data=held,
                                         base_model=str(moved),
                                         reference_base_model=str(moved)))["heldout"]
    assert against_itself["m_theta"] == 0 and against_itself["nll_per_token"] == whole[
        "nll_per_token"]
    # a hub id is known by its name only: not the folder the run trained from, even where
    # the local hub cache holds the same weights; one it does not hold is named as missing
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match="--base-model someone/tiny-model: no such folder, nor "
                                         "a model in the local Hugging Face cache"):
        run_eval(EvalConfig(model=str(run), data=held, base_model="someone/tiny-model"))
    hub = tmp_path / "hub" / "models--someone--tiny-model"
    shutil.copytree(moved, hub / "snapshots" / "abc")
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc")
    with pytest.raises(ModelError, match=r"someone/tiny-model: not the model the LoRA run in "
                                         f"{run} trained from \\(a hub id is checked by its "
                                         r"name, and the run trained from a folder\): .*; give "
                                         "the folder of the model it trained from with "
                                         "--base-model"):
        run_eval(EvalConfig(model=str(run), data=held, base_model="someone/tiny-model"))
    # the same weights under another config.json are another model too
    edited = tmp_path / "edited"
    shutil.copytree(moved, edited)
    config = json.loads((edited / "config.json").read_text())
    config["rms_norm_eps"] = 0.5
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=f"{edited}: not the model the LoRA run in {run} trained "
                                         "from: its config.json differs from the one it "
                                         r"recorded \(rms_norm_eps 1e-06 -> 0.5\)"):
        run_eval(EvalConfig(model=str(run), data=held, base_model=str(edited)))
    # a run trained on other weights than its cache's (--allow-mismatch): its adapters are
    # checked against the base it trained on, recorded in its run_config.json
    other = tmp_path / "other-run"
    _train(cache, other, model=str(base), allow_mismatch=True, step0_check=False, lora_r=4,
           lr=1e-2, batch_size=3, micro_batch_size=3)
    run_eval(EvalConfig(model=str(other), data=held))
    with pytest.raises(ModelError, match=f"{moved}: not the model the LoRA run in {other} "
                                         "trained from .*differ from those it recorded"):
        run_eval(EvalConfig(model=str(other), data=held, base_model=str(moved)))
    # such a run from before 0.9.3 recorded nothing of its base: scored, and said
    record = json.loads((other / "run_config.json").read_text())
    del record["base_fingerprint"]
    (other / "run_config.json").write_text(json.dumps(record))
    said = io.StringIO()
    run_eval(EvalConfig(model=str(other), data=held, base_model=str(moved)),
             Console(file=said, width=400))
    assert ("the run (--allow-mismatch, before 0.9.3) recorded nothing of its base's weights, "
            "so nothing checks that this base is the one it trained on") in " ".join(
                said.getvalue().split())
