"""Precompute then train on the tiny random model, through the Python API."""

import os
from pathlib import Path

from minorsft.cache import iter_rows, read_metadata
from minorsft.precompute import PrecomputeConfig, run_precompute
from minorsft.train import TrainConfig, run_train


def test_precompute_then_train_tiny(tiny_model_dir, demo_jsonl, tmp_path):
    cache = tmp_path / "ref.parquet"
    summary = run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(demo_jsonl),
                                              out=str(cache), max_batch_tokens=256))
    assert summary.rows_cached == 16 and summary.rows_rejected == 0
    metadata = read_metadata(cache)
    assert metadata["rows"] == 16 and metadata["engine"] == "transformers"
    rows = list(iter_rows(cache))
    assert [r["id"] for r in rows][:4] == ["a0", "b0", "c0", "d0"]
    assert all(r["num_tokens"] == sum(r["answer_mask"]) > 0 for r in rows)
    history = run_train(TrainConfig(cache=str(cache), output=str(tmp_path / "run"),
                                    batch_size=8, micro_batch_size=4, lr=1e-3))
    assert len(history) == 2
    assert abs(history[0]["m_theta"]) < 1e-5
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    # on a CPU, the resident peak: more than an interpreter with torch loaded, less than the RAM
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    assert 0.05 < history[-1]["peak_rss_gib"] < ram


def test_a_cache_made_with_a_relative_model_folder_trains_from_anywhere(
        tiny_model_dir, demo_jsonl, tmp_path, monkeypatch):
    """The cache named the model folder as given (relative to where precompute ran), so train
    and verify without --model looked for it in the wrong place."""
    import shutil

    import pytest

    from minorsft.models import ModelError
    from minorsft.verify import VerifyConfig, run_verify

    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir, work / "models" / "tiny")
    monkeypatch.chdir(work)
    cache = tmp_path / "ref.parquet"
    run_precompute(PrecomputeConfig(model="./models/tiny", data=str(demo_jsonl), out=str(cache)))
    assert Path(read_metadata(cache)["model_path"]) == (work / "models" / "tiny").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    history = run_train(TrainConfig(cache=str(cache), output="run", batch_size=8, max_steps=1))
    assert len(history) == 1
    assert run_verify(VerifyConfig(cache=str(cache), sample=2)).rows == 2
    # Moved away: the error says the model came from the cache, and how to name another; a
    # folder of the same relative name where train runs is not taken for it.
    shutil.move(work / "models", tmp_path / "moved")
    shutil.copytree(tmp_path / "moved", elsewhere / "models")
    with pytest.raises(ModelError, match=r"not there any more; it is the model that wrote "
                                         r".*ref.parquet.*--model names"):
        run_train(TrainConfig(cache=str(cache), output="run2", batch_size=8, max_steps=1))
