"""The drift check (verify.py), the engine choice, and `minorsft verify` on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from minorsft.cache import CacheWriter, iter_rows, read_metadata
from minorsft.cli import app
from minorsft.data import Example
from minorsft.engines import make_engine, resolve_engine_name
from minorsft.engines.hf import TransformersEngine
from minorsft.precompute import PrecomputeConfig, run_precompute
from minorsft.verify import format_report, measure_drift, sample_rows


class FixedEngine:
    """A stand-in trainer engine returning given per-token log-probs (the maths test's input)."""

    name, version = "fixed", "0"

    def __init__(self, tokens):
        self.tokens = tokens

    def score_tokens(self, examples):
        return self.tokens[: len(examples)]

    def describe(self):
        return {"dtype": "float32"}


def _row(row_id, ref_logps, num_tokens):
    return {"id": row_id, "line": 1, "input_ids": list(range(num_tokens + 1)),
            "answer_mask": [False] + [True] * num_tokens, "num_tokens": num_tokens,
            "ref_logps": ref_logps}


def test_measure_drift_figures_by_hand():
    """Two rows, m = 2 and 4.

    Trainer sums: -1.0 and -2.5; cache: -1.5 and -2.0, so delta_r = +0.5 and -0.5.
    m_theta at step 0 = (0.5/2 + (-0.5)/4) / 2 = 0.0625. Coefficient 2 sigmoid(-beta r) at
    beta = 1: 2/(1+e^0.5) = 0.75508 and 2/(1+e^-0.5) = 1.24492. Per-token |d| against the
    reference engine's tokens (which sum to the cached values): 0.35, 0.15, 0, 0, 0, 0.5.
    """
    rows = [_row("a", -1.5, 2), _row("b", -2.0, 4)]
    trainer = FixedEngine([[-0.4, -0.6], [-0.5, -0.5, -0.5, -1.0]])
    reference_tokens = [[-0.75, -0.75], [-0.5, -0.5, -0.5, -0.5]]
    report = measure_drift(rows, trainer, beta=1.0, reference={"engine": "x"},
                           max_delta_r=0.4, reference_token_logps=reference_tokens)
    assert report.delta_r_abs["max"] == pytest.approx(0.5)
    assert report.delta_r_mean == pytest.approx(0.0)
    assert report.m_theta_step0 == pytest.approx(0.0625)
    assert report.coefficient["min"] == pytest.approx(2 / (1 + math.exp(0.5)))
    assert report.coefficient["max"] == pytest.approx(2 / (1 + math.exp(-0.5)))
    assert report.coefficient_max_error == pytest.approx(2 / (1 + math.exp(-0.5)) - 1)
    assert report.token_abs_max == pytest.approx(0.5)
    assert report.token_abs_mean == pytest.approx(1.0 / 6)
    assert report.reference_repeat_max == pytest.approx(0.0)
    assert not report.passed  # 0.5 > 0.4
    assert json.dumps(report.as_dict())
    assert "0.00e+00 nats (batching non-determinism)" in format_report(report)
    # a cached sum 5 nats off its engine's (a value changed by hand): not batching
    tampered = [_row("a", -6.5, 2), _row("b", -2.0, 4)]
    text = format_report(measure_drift(tampered, trainer, beta=1.0, reference={"engine": "x"},
                                       max_delta_r=0.4,
                                       reference_token_logps=reference_tokens))
    assert ("cache vs its own engine again: max 5.00e+00 nats (more than batching moves them: "
            "the cached values are not what that engine computes for these rows now)" in text)
    assert "worst row: id 'a' (input line 1), d r +5.5 over 2 answer tokens" in text
    loose = format_report(measure_drift(tampered, trainer, beta=1.0, reference={"engine": "x"},
                                        max_delta_r=10, reference_token_logps=reference_tokens))
    assert "5.00e+00 nats (more than batching moves them" in loose  # (whatever the threshold)


def test_a_nan_drift_fails_the_check_and_heads_the_worst_rows():
    """With a NaN among the deltas, sorted() left the largest magnitude finite: "OK"."""
    rows = [_row("a", -1.0, 1), _row("b", -1.0, 1), _row("c", -1.0, 1)]
    trainer = FixedEngine([[-1.1], [float("nan")], [-1.2]])
    report = measure_drift(rows, trainer, beta=0.04, reference={}, max_delta_r=1.0)
    assert not report.passed
    assert math.isnan(report.delta_r_abs["max"])
    assert report.worst_rows[0][0] == "b"
    assert [row[0] for row in report.worst_rows[1:]] == ["c", "a"]
    # the text names it too, and where it is in the input
    assert "  worst row: id 'b' (input line 1), d r +nan over 1 answer tokens (--json lists " \
        "the 5 worst)" in format_report(report)


def test_measure_drift_refuses_a_token_count_mismatch():
    with pytest.raises(ValueError, match="answer tokens"):
        measure_drift([_row("a", -1.0, 3)], FixedEngine([[-1.0]]), 0.04, {})


def test_samples_are_seeded_and_sized():
    rows = [{"i": i} for i in range(100)]
    first = sample_rows(iter(rows), 10, seed=3)
    assert first == sample_rows(iter(rows), 10, seed=3)
    assert len(first) == 10 and [r["i"] for r in first] == sorted(r["i"] for r in first)
    assert sample_rows(iter(rows[:4]), 10) == rows[:4]


def test_auto_engine_is_transformers_without_a_gpu_or_vllm():
    assert resolve_engine_name("transformers") == "transformers"
    if not torch.cuda.is_available():
        assert resolve_engine_name("auto") == "transformers"
    with pytest.raises(ValueError, match="unknown engine"):
        resolve_engine_name("tgi")


def test_vllm_engine_without_vllm_says_how_to_install(tiny_model_dir):
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="not installed"):
            make_engine("vllm", str(tiny_model_dir), "float32")
    else:
        pytest.skip("vLLM is installed here (tests/vllm covers it)")


def test_precompute_stores_the_drift_check(tiny_model_dir, demo_jsonl, tmp_path):
    """transformers fp32 cache vs transformers fp32 trainer: drift only from batching."""
    cache = tmp_path / "ref.parquet"
    run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(demo_jsonl),
                                    out=str(cache), max_batch_tokens=256, verify_sample=6))
    drift = read_metadata(cache)["drift"]
    assert drift["rows"] == 6 and drift["passed"]
    assert drift["reference"]["engine"] == "transformers"
    assert drift["delta_r_abs"]["max"] < 1e-4
    assert drift["token_abs_max"] < 1e-4


def test_verify_cli_passes_then_fails_on_a_shifted_cache(tiny_model_dir, demo_jsonl, tmp_path):
    cache = tmp_path / "ref.parquet"
    run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(demo_jsonl),
                                    out=str(cache), max_batch_tokens=256, verify_sample=0))
    assert "drift" not in read_metadata(cache)
    runner = CliRunner()
    result = runner.invoke(app, ["verify", "--cache", str(cache), "--sample", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == 8 and report["delta_r_abs"]["max"] < 1e-4
    assert report["token_abs_mean"] is None  # per-token figures need --rescore
    # more than the cache holds: all its rows, and a note saying so (it said nothing)
    result = runner.invoke(app, ["verify", "--cache", str(cache), "--sample", "100", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == 16
    assert "the cache has 16 rows, fewer than --sample 100: all of them are checked" in " ".join(
        result.output.split())

    result = runner.invoke(app, ["verify", "--cache", str(cache), "--sample", "4", "--rescore",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["token_abs_max"] < 1e-4
    assert "drift" not in read_metadata(cache)  # (only --store writes it)
    # --store keeps the figures where `cache info` shows them, as precompute's check does
    result = runner.invoke(app, ["verify", "--cache", str(cache), "--sample", "4", "--store",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert read_metadata(cache)["drift"] == json.loads(result.stdout)
    info = runner.invoke(app, ["cache", "info", str(cache)]).output
    assert "drift rows: 4" in info and "drift token_abs_max: not measured" in info
    assert not any(line.strip().startswith("drift") and "None" in line
                   for line in info.splitlines())
    result = runner.invoke(app, ["verify", "--cache", str(cache), "--store", "--allow-mismatch"])
    assert result.exit_code == 2 and "--store writes the figures" in result.output

    # The same cache with every reference log-prob moved by 2 nats: |delta r| = 2 > 1.
    shifted = tmp_path / "shifted.parquet"
    rows = list(iter_rows(cache))
    writer = CacheWriter(shifted, {k: v for k, v in read_metadata(cache).items()
                                   if k not in {"rows", "format_version"}})
    writer.write({key: [r[key] - 2.0 if key == "ref_logps" else r[key] for r in rows]
                  for key in rows[0]})
    writer.close()
    result = runner.invoke(app, ["verify", "--cache", str(shifted), "--sample", "4"])
    assert result.exit_code == 1
    assert "ABOVE THRESHOLD" in result.output
    # not numbers: refused (--beta nan printed nan figures and "OK"; --max-delta-r nan always
    # failed, as if the cache had drifted)
    for option, value in (("--beta", "nan"), ("--beta", "inf"), ("--max-delta-r", "nan")):
        result = runner.invoke(app, ["verify", "--cache", str(cache), "--sample", "4", option,
                                     value])
        assert result.exit_code == 2 and option in result.output, result.output


def test_rescore_rebuilds_the_engine_with_the_caches_vllm_settings(tiny_model_dir, demo_jsonl,
                                                                   tmp_path, monkeypatch):
    """Only dtype and budget were passed on: a cache scored by vLLM over 2 GPUs, or with a
    short max_model_len, was rescored on one GPU at the model's full length."""
    from minorsft.cache import update_metadata

    cache = tmp_path / "ref.parquet"
    run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(demo_jsonl),
                                    out=str(cache), max_batch_tokens=256, verify_sample=0))
    settings = {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5, "max_model_len": 256}
    update_metadata(cache, {"engine_settings": settings})
    seen = {}

    def recording_make_engine(name, *args, **vllm_options):
        seen.update(vllm_options)
        return make_engine(name, *args)

    monkeypatch.setattr("minorsft.engines.make_engine", recording_make_engine)
    result = CliRunner().invoke(app, ["verify", "--cache", str(cache), "--sample", "2",
                                      "--rescore"])
    assert result.exit_code == 0, result.output
    assert seen == settings
    # scored on another kind of device: its share of memory is not this one's (vLLM's CPU
    # build refuses a GPU's 0.9 share of RAM)
    other = "cpu" if torch.cuda.is_available() else "cuda"
    update_metadata(cache, {"engine_settings": dict(settings, device=other)})
    seen.clear()
    result = CliRunner().invoke(app, ["verify", "--cache", str(cache), "--sample", "2",
                                      "--rescore"])
    assert result.exit_code == 0, result.output
    assert seen == dict(settings, gpu_memory_utilization=None)


def test_bfloat16_training_dtype_shows_drift(tiny_model_dir, demo_jsonl, tmp_path):
    """A fp32 cache checked against a bf16 trainer must report a non-zero drift."""
    cache = tmp_path / "ref.parquet"
    run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(demo_jsonl),
                                    out=str(cache), max_batch_tokens=256, verify_sample=8,
                                    verify_dtype="bfloat16"))
    drift = read_metadata(cache)["drift"]
    assert drift["trainer"]["dtype"] == "bfloat16"
    assert drift["token_abs_max"] > 1e-4
    assert drift["delta_r_abs"]["max"] > 1e-4


def test_transformers_score_tokens_sum_to_score(tiny_model_dir):
    engine = TransformersEngine(str(tiny_model_dir), dtype="float32", max_batch_tokens=64)
    examples = [Example("a", 1, [5, 6, 7, 8, 9], [False, False, True, True, True]),
                Example("b", 2, [5, 9, 7], [False, True, True])]
    tokens = engine.score_tokens(examples)
    assert [len(t) for t in tokens] == [3, 2]
    assert [sum(t) for t in tokens] == pytest.approx(engine.score(examples), abs=1e-5)


def test_coefficient_is_exact_far_from_zero():
    """2 sigmoid(-beta r) overflowed math.exp past beta r = 709 (a traceback in verify)."""
    from minorsft.verify import _coefficient

    assert _coefficient(0.04, 0.0) == 1.0
    assert _coefficient(2.0, 439.0) == pytest.approx(2 * math.exp(-878.0), abs=0)
    assert _coefficient(2.0, -439.0) == 2.0
    assert _coefficient(0.5, 3.0) == pytest.approx(2 / (1 + math.exp(1.5)), rel=1e-15)
