"""Resumable, shardable precompute: kill -9 and resume, changed inputs refused, shards, merge."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import minorsft.precompute
from minorsft.cache import (
    CacheError,
    iter_rows,
    load_manifests,
    open_cache,
    read_metadata,
    update_metadata,
)
from minorsft.precompute import PrecomputeConfig, run_precompute

from .conftest import DEMO_ROWS, run_command, write_jsonl

SETTINGS = {"part_rows": 6, "window_rows": 4, "max_batch_tokens": 256}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: faster on a busy 2-core machine, and the same numbers as the
    subprocesses below (which get OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows_file(tmp_path, count: int):
    rows = [dict(DEMO_ROWS[i % 4], id=f"r{i}") for i in range(count)]
    return write_jsonl(tmp_path / "rows.jsonl", rows)


def precompute(model, data, out, **overrides):
    config = PrecomputeConfig(model=str(model), out=str(out),
                              data=data if isinstance(data, list) else str(data),
                              **{**SETTINGS, **overrides})
    return run_precompute(config)


def test_kill_9_mid_run_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    data = rows_file(tmp_path, 240)  # 40 parts
    reference = tmp_path / "reference"
    precompute(tiny_model_dir, data, reference)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "minorsft", "precompute", "--model", str(tiny_model_dir),
               "--data", str(data), "--out", str(out), "--part-rows", "6",
               "--max-batch-tokens", "256"]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="250")
    # The CLI's window is the config default; make the reference use the same.
    reference_cli = tmp_path / "reference-cli"
    precompute(tiny_model_dir, data, reference_cli, window_rows=PrecomputeConfig.window_rows)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    manifest = out / "_manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and len(json.loads(manifest.read_text())["parts"]) >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(json.loads(manifest.read_text())["parts"])
    assert 2 <= done_before < 40, "the process was not killed mid-run"
    with pytest.raises(CacheError, match="has not finished"):
        read_metadata(out)  # an interrupted cache is refused, not read short
    resumed = run_command(command, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done_before} parts were already done" in resumed.stderr
    assert list(iter_rows(out)) == list(iter_rows(reference_cli))
    assert read_metadata(out)["rows"] == 240
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    # Part and window sizes do not change the rows, only (maybe) the last bits of ref_logps.
    assert [r["id"] for r in iter_rows(reference)] == [r["id"] for r in iter_rows(out)]


def test_crash_between_part_file_and_manifest_is_redone(tiny_model_dir, tmp_path, monkeypatch):
    import minorsft.precompute as precompute_module

    data = rows_file(tmp_path, 20)
    reference = tmp_path / "reference"
    precompute(tiny_model_dir, data, reference)
    out = tmp_path / "out"
    real_write, calls = precompute_module.write_manifest, []

    def crash_on_third(directory, manifest):
        calls.append(1)
        if len(calls) == 3:  # part 2's file is in place, its manifest entry is not
            raise KeyboardInterrupt
        real_write(directory, manifest)

    monkeypatch.setattr(precompute_module, "write_manifest", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        precompute(tiny_model_dir, data, out)
    monkeypatch.setattr(precompute_module, "write_manifest", real_write)
    assert (out / "part-00002.parquet").exists()
    (out / ".part-00003.parquet.stale.tmp").write_text("left by a killed run")
    summary = precompute(tiny_model_dir, data, out)
    assert summary.parts_skipped == 2 and summary.parts_written == 2
    assert list(iter_rows(out)) == list(iter_rows(reference))
    assert not (out / ".part-00003.parquet.stale.tmp").exists()


def test_an_interrupted_run_stops_its_tokenizing_thread(tiny_model_dir, tmp_path, monkeypatch):
    """Ctrl-C while rows are still waiting to be tokenized stops the read-ahead thread at once,
    not when the generator is collected (a traceback kept alive would keep it running)."""
    import minorsft.precompute as precompute_module

    data = rows_file(tmp_path, 60)  # the thread is at most 4 rows ahead of row 18 when it stops
    real_write, calls = precompute_module.write_manifest, []

    def crash_on_third(directory, manifest):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(directory, manifest)

    monkeypatch.setattr(precompute_module, "write_manifest", crash_on_third)
    with pytest.raises(KeyboardInterrupt) as caught:
        precompute(tiny_model_dir, data, tmp_path / "out")
    assert caught.traceback  # the frames (and the generator in them) are still referenced here
    assert "minorsft-read-ahead" not in [thread.name for thread in threading.enumerate()]


def test_an_interrupted_run_stops_its_tokenize_workers(tiny_model_dir, tmp_path, monkeypatch):
    import multiprocessing

    import minorsft.precompute as precompute_module

    data = rows_file(tmp_path, 600)
    real_write, calls = precompute_module.write_manifest, []

    def crash_on_third(directory, manifest):
        calls.append(1)
        if len(calls) == 3:
            assert len(multiprocessing.active_children()) == 2  # (they were working)
            raise KeyboardInterrupt
        real_write(directory, manifest)

    monkeypatch.setattr(precompute_module, "write_manifest", crash_on_third)
    with pytest.raises(KeyboardInterrupt) as caught:
        precompute(tiny_model_dir, data, tmp_path / "out", tokenize_workers=2)
    assert caught.traceback
    assert multiprocessing.active_children() == []
    assert "minorsft-read-ahead" not in [thread.name for thread in threading.enumerate()]


def process_state(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) from /proc, None for a process that is gone."""
    try:  # (the command may hold spaces: state and parent are the fields after the last ")")
        state, parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return None
    return state, int(parent)


def children_of(pid: int) -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
            and (process_state(int(entry.name)) or ("", 0))[1] == pid]


def running(pid: int) -> bool:
    return (process_state(pid) or ("Z", 0))[0] != "Z"  # (a zombie has ended)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_tokenize_workers_of_a_killed_run_exit_and_the_run_resumes(tiny_model_dir, tmp_path):
    """kill -9 leaves the parent no chance to stop its workers: they must end by themselves,
    and must not hold the cache's lock (the resume would be refused)."""
    data = rows_file(tmp_path, 240)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "minorsft", "precompute", "--model", str(tiny_model_dir),
               "--data", str(data), "--out", str(out), "--part-rows", "6",
               "--max-batch-tokens", "256", "--tokenize-workers", "2", "--verify-sample", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="250")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    manifest = out / "_manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text())["parts"]:
            break
        time.sleep(0.02)
    workers = children_of(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(workers) == 2, "the run had no workers when it was killed"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(map(running, workers)):
        time.sleep(0.05)
    assert not any(map(running, workers)), "workers outlived their killed parent"
    resumed = run_command(command, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"\(\d+ parts? (was|were) already done\)", resumed.stderr)
    assert read_metadata(out)["rows"] == 240


def test_tokenize_workers_write_the_same_cache_and_rejects(tiny_model_dir, tmp_path):
    rows = [dict(DEMO_ROWS[i % 4], id=f"r{i}") for i in range(40)]
    rows[7] = {"id": "r7", "prompt": "no answer"}
    rows[20] = dict(rows[3])  # a repeated id
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    here = precompute(tiny_model_dir, data, tmp_path / "here", on_bad="skip",
                      tokenize_workers=0)
    workers = precompute(tiny_model_dir, data, tmp_path / "workers", on_bad="skip",
                         tokenize_workers=2)
    assert (here.rows_cached, here.rows_rejected) == (38, 2)
    assert (workers.rows_cached, workers.rows_rejected) == (38, 2)
    assert list(iter_rows(tmp_path / "workers")) == list(iter_rows(tmp_path / "here"))
    rejects = [sorted(path.relative_to(tmp_path / out).as_posix()
                      for path in (tmp_path / out / "_rejects").rglob("*")) + [
        path.read_text() for path in sorted((tmp_path / out / "_rejects").rglob("*.jsonl"))]
        for out in ("here", "workers")]
    assert rejects[0] == rejects[1] and len(rejects[0]) > 1
    with pytest.raises(ValueError, match="--tokenize-workers"):
        PrecomputeConfig(model="m", data="d", out="o", tokenize_workers=-1)


def test_a_row_missing_from_the_tokenized_rows_stops_the_run_before_its_part(
        tiny_model_dir, tmp_path, monkeypatch):
    """Every row's index must arrive, in order: a part recorded without one of its rows would
    be trusted by every resume."""
    import minorsft.precompute as precompute_module

    real = precompute_module.classify_rows

    def losing_row_4(*args, **kwargs):
        return ((index, item) for index, item in real(*args, **kwargs) if index != 4)

    monkeypatch.setattr(precompute_module, "classify_rows", losing_row_4)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="row 4 of the input is missing"):
        precompute(tiny_model_dir, rows_file(tmp_path, 20), out)
    assert not out.exists() or not any(manifest["parts"] for manifest in load_manifests(out))


def test_without_processes_rows_are_tokenized_here_with_a_note(tiny_model_dir, tmp_path,
                                                               monkeypatch):
    import io

    from rich.console import Console

    import minorsft.precompute as precompute_module

    def no_semaphores(*args):  # as a container without /dev/shm
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(precompute_module, "RowWorkers", no_semaphores)
    data = rows_file(tmp_path, 10)
    said = io.StringIO()
    config = PrecomputeConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "o"),
                              tokenize_workers=2, **SETTINGS)
    assert run_precompute(config, Console(file=said, width=200)).rows_cached == 10
    assert "note: no tokenize workers (OSError: [Errno 38] Function not implemented)" in \
        said.getvalue()


def test_changed_setting_or_input_is_refused_naming_it(tiny_model_dir, tmp_path, monkeypatch):
    data = rows_file(tmp_path, 8)
    out = tmp_path / "out"
    precompute(tiny_model_dir, data, out, max_length=64)
    make_engine = minorsft.precompute.make_engine

    def no_engine(*args, **kwargs):
        raise AssertionError("the model loaded before the refusal (minutes for a 7B model)")

    monkeypatch.setattr(minorsft.precompute, "make_engine", no_engine)
    with pytest.raises(CacheError, match=r"max_length: 64 -> 32") as caught:
        precompute(tiny_model_dir, data, out, max_length=32)
    assert "--overwrite" in str(caught.value)
    with pytest.raises(CacheError, match="part_rows: 6 -> 5"):
        precompute(tiny_model_dir, data, out, max_length=64, part_rows=5)
    with pytest.raises(CacheError, match=r"\n  fields.train_turns: 'all' -> 'last'\n"):
        precompute(tiny_model_dir, data, out, max_length=64, train_turns="last")
    assert "Run the original command to resume it" in str(caught.value)
    # an upgrade mid-cache: the original command now runs the new version, so it is no advice
    with monkeypatch.context() as upgraded:
        upgraded.setattr(minorsft.precompute, "__version__", "99.0")
        with pytest.raises(CacheError, match=r"minorsft_version: '[0-9.]+' -> '99.0'") as caught:
            precompute(tiny_model_dir, data, out, max_length=64)
    assert "Finish it with minorsft " in str(caught.value)
    assert "Run the original command" not in str(caught.value)
    monkeypatch.setattr(minorsft.precompute, "make_engine", make_engine)
    with pytest.raises(CacheError, match="max_batch_tokens: 256 -> 128"):  # known once it loads
        precompute(tiny_model_dir, data, out, max_length=64, max_batch_tokens=128)
    rows_file(tmp_path, 9)  # the input grows by a row
    with pytest.raises(CacheError, match="input content: sha256"):
        precompute(tiny_model_dir, data, out, max_length=64)
    summary = precompute(tiny_model_dir, data, out, max_length=64, overwrite=True)
    assert summary.rows_cached == 9 and read_metadata(out)["rows"] == 9
    again = precompute(tiny_model_dir, data, out, max_length=64)  # nothing left to do
    assert again.parts_written == 0 and again.parts_skipped == 2 and again.rows_cached == 9


def test_shards_in_one_directory_and_merged_from_two(tiny_model_dir, tmp_path):
    from minorsft.cache import merge_caches

    data = rows_file(tmp_path, 20)
    reference = tmp_path / "reference"
    precompute(tiny_model_dir, data, reference)
    expected = list(iter_rows(reference))
    shared = tmp_path / "shared"
    first = precompute(tiny_model_dir, data, shared, shard="0/2")
    assert not first.complete and "shard 1/2 has not started" in first.waiting_for
    with pytest.raises(CacheError, match="shard 1/2 has not started"):
        read_metadata(shared)
    second = precompute(tiny_model_dir, data, shared, shard="1/2")
    assert second.complete and second.rows_cached == 20
    assert list(iter_rows(shared)) == expected
    parts = {k for m in load_manifests(shared) for k in m["parts"]}
    assert parts == {"0", "1", "2", "3"}

    node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"
    precompute(tiny_model_dir, data, node_a, shard="0/2")
    precompute(tiny_model_dir, data, node_b, shard="1/2")
    with pytest.raises(CacheError, match="not make a complete cache"):
        merge_caches([node_a], tmp_path / "merged")
    merged = merge_caches([node_a, node_b], tmp_path / "merged")
    assert merged.metadata["rows"] == 20 and merged.metadata["shards"] == 1
    assert list(iter_rows(tmp_path / "merged")) == expected
    # --overwrite replaces the cache and keeps the user's files (it deleted the whole folder)
    (tmp_path / "merged" / "notes.txt").write_text("mine")
    (tmp_path / "merged" / ".hidden").write_text("mine too")
    with pytest.raises(CacheError, match="exists: pass --overwrite"):
        merge_caches([node_a, node_b], tmp_path / "merged")
    merge_caches([node_a, node_b], tmp_path / "merged", overwrite=True)
    assert (tmp_path / "merged" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "merged" / ".hidden").read_text() == "mine too"
    assert not list(tmp_path.glob(".merged.*"))  # no staging or old cache left beside it
    assert list(iter_rows(tmp_path / "merged")) == expected
    # a part gone from a merged cache: merge again (it said to run "the same precompute
    # command", which a merged cache has none of)
    copy = tmp_path / "merged-copy"
    shutil.copytree(tmp_path / "merged", copy)
    (copy / load_manifests(copy)[0]["parts"]["1"]["file"]).unlink()
    with pytest.raises(CacheError, match=re.escape(
            f"part 1 is listed in the manifest but missing; recompute it where the shard was "
            f"scored (the same precompute command) and merge again (minorsft cache merge "
            f"{node_a} {node_b} --out {copy} --overwrite)")):
        open_cache(copy)
    with pytest.raises(CacheError, match="shards: 1 -> 2"):  # no mixing of schemes
        precompute(tiny_model_dir, data, tmp_path / "merged", shard="0/2")
    # shards scored by two versions (an upgrade between them): said so, with the way on
    manifest_path = next(node_b.glob("_manifest*.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["settings"]["minorsft_version"] = "99.0"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="-> '99.0'; score every shard with one minorsft "
                                         "version"):
        merge_caches([node_a, node_b], tmp_path / "merged-2")


def test_merge_names_where_the_users_files_are_when_moving_them_back_fails(
        tiny_model_dir, tmp_path, monkeypatch):
    """The failure left them in a hidden folder beside the cache, with no word of where."""
    from pathlib import Path

    from minorsft.cache import merge_caches

    data = rows_file(tmp_path, 8)
    shards = [tmp_path / "s0", tmp_path / "s1"]
    for index, shard in enumerate(shards):
        precompute(tiny_model_dir, data, shard, shard=f"{index}/2")
    out = tmp_path / "merged"
    merge_caches(shards, out)
    (out / "notes.txt").write_text("mine")
    real_replace = os.replace

    def replace(source, target):
        if Path(source).name == "notes.txt":
            raise PermissionError(13, "Permission denied", str(source))
        real_replace(source, target)

    monkeypatch.setattr("minorsft.cache.os.replace", replace)
    with pytest.raises(CacheError, match="the merged cache is in place") as caught:
        merge_caches(shards, out, overwrite=True)
    (aside,) = tmp_path.glob(".merged.replaced-*")
    assert str(aside) in str(caught.value)
    assert (aside / "notes.txt").read_text() == "mine"
    assert len(list(iter_rows(out))) == 8  # the new cache stayed where it belongs


def test_shard_spec_is_checked():
    with pytest.raises(ValueError, match="I counts from 0"):
        PrecomputeConfig(model="m", data="d", out="o", shard="2/2")
    with pytest.raises(ValueError, match="expected I/N"):
        PrecomputeConfig(model="m", data="d", out="o", shard="first")
    with pytest.raises(ValueError, match="N, the number of shards, must be at least 1"):
        PrecomputeConfig(model="m", data="d", out="o", shard="1/0")


def test_a_finished_cache_without_drift_gets_it_on_rerun(tiny_model_dir, tmp_path, monkeypatch):
    """Stopped after the last part but before the drift check: the rerun measures the drift,
    and a later rerun of a cache that has it scores nothing and checks nothing."""
    data, out = rows_file(tmp_path, 6), tmp_path / "cache"
    precompute(tiny_model_dir, data, out, verify_sample=0)  # as if stopped before the check
    assert "drift" not in read_metadata(out)
    precompute(tiny_model_dir, data, out, verify_sample=4)
    drift = read_metadata(out)["drift"]
    assert drift["rows"] == 4

    def must_not_run(*args, **kwargs):
        raise AssertionError("the drift check ran again")

    monkeypatch.setattr("minorsft.precompute.precompute_drift_check", must_not_run)
    precompute(tiny_model_dir, data, out, verify_sample=4)
    assert read_metadata(out)["drift"] == drift


def test_a_second_process_on_the_same_shard_is_refused(tiny_model_dir, tmp_path):
    """The lock of a running precompute (held here by hand) stops a second one, naming it."""
    import fcntl

    data, out = rows_file(tmp_path, 4), tmp_path / "cache"
    out.mkdir()
    with (out / "._manifest.shard-1-of-2.json.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CacheError, match="another precompute is writing shard 1/2 of"):
            precompute(tiny_model_dir, data, out, shard="1/2")
        precompute(tiny_model_dir, data, out, shard="0/2")  # another shard: not blocked
    precompute(tiny_model_dir, data, out, shard="1/2")  # the lock went with its holder
    assert sum(1 for _ in iter_rows(out)) == 4


def test_shards_finishing_together_measure_the_drift_once(tiny_model_dir, tmp_path,
                                                          monkeypatch):
    """Two shards that finish at the same moment both find the cache whole. The drift check's
    lock (held here by hand, as by the first shard's check) makes the second wait; it then
    finds the first one's figures and measures nothing."""
    import fcntl
    import threading

    data, out = rows_file(tmp_path, 6), tmp_path / "cache"
    precompute(tiny_model_dir, data, out, verify_sample=0)  # whole, no drift yet

    def must_not_run(*args, **kwargs):
        raise AssertionError("the drift check ran a second time")

    monkeypatch.setattr("minorsft.precompute.precompute_drift_check", must_not_run)
    errors = []

    def second_shard():
        try:
            precompute(tiny_model_dir, data, out, verify_sample=4)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    with (out / "._drift.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = threading.Thread(target=second_shard)
        waiting.start()
        waiting.join(timeout=3)
        assert waiting.is_alive()  # blocked on the lock, not measuring
        update_metadata(out, {"drift": {"rows": 4, "by": "the first shard"}})
    waiting.join(timeout=60)
    assert not waiting.is_alive() and not errors, errors
    assert read_metadata(out)["drift"] == {"rows": 4, "by": "the first shard"}


def test_a_failed_first_shard_leaves_a_shard_beside_it_alone(tiny_model_dir, tmp_path,
                                                             monkeypatch):
    """A run that created --out and failed before its first part removed the whole folder,
    the lock and files of a shard started beside it in the meantime included."""
    import minorsft.precompute as precompute_module

    out = tmp_path / "cache"
    other_lock = out / "._manifest.shard-1-of-2.json.lock"

    def fail_after_another_shard_started(config, out, shard, *args):
        if shard is not None:
            other_lock.write_text("")
        raise RuntimeError("model failed to load")

    monkeypatch.setattr(precompute_module, "_precompute_into", fail_after_another_shard_started)
    with pytest.raises(RuntimeError):
        precompute(tiny_model_dir, rows_file(tmp_path, 4), out, shard="0/2")
    assert sorted(p.name for p in out.iterdir()) == [other_lock.name]
    other_lock.unlink()
    out.rmdir()
    with pytest.raises(RuntimeError):  # alone, it leaves nothing behind
        precompute(tiny_model_dir, rows_file(tmp_path, 4), out)
    assert not out.exists()


def test_vllm_model_len_defaults_to_what_max_length_needs(tiny_model_dir):
    """None let vLLM reserve KV cache for the model's whole context (128k for Llama-3.1)."""
    from minorsft.models import read_model_config
    from minorsft.precompute import _model_len_for

    def model_len(max_length):
        return _model_len_for(PrecomputeConfig(model="m", data="d", out="o",
                                               max_length=max_length),
                              read_model_config(str(tiny_model_dir)))

    assert model_len(100) == 101
    # the tiny model's max_position_embeddings + 1: a row of its full length fits (at 512, a
    # --max-length of 512 or more could score no row that long)
    assert model_len(2048) == model_len(512) == 513 and model_len(511) == 512
    # no --max-length (0): the model's limit + 1 too, not vLLM's default of the limit itself
    assert model_len(None) == 513


def test_vllm_model_len_is_not_capped_below_a_context_rope_scaling_extends():
    """vLLM multiplies a yarn/linear/dynamic model's original context by the factor: capping at
    max_position_embeddings + 1 would refuse its longer rows."""
    from transformers import LlamaConfig

    from minorsft.precompute import _model_len_for

    def model_len(max_length, model_config):
        return _model_len_for(PrecomputeConfig(model="m", data="d", out="o",
                                               max_length=max_length), model_config)

    yarn = LlamaConfig(max_position_embeddings=4096, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096})
    # its context is 4 x 4096: capped at that + 1, which the engine lets vLLM take
    assert model_len(10_000, yarn) == 10_001
    assert model_len(None, yarn) == model_len(20_000, yarn) == 16_385
    # and a note only past that context, not past max_position_embeddings
    from minorsft.models import context_note

    assert context_note(10_000, "m", yarn) is None
    assert "context of 16384 tokens" in context_note(20_000, "m", yarn)
    # Llama-3.1's scaling writes the extended context into max_position_embeddings itself
    llama3 = LlamaConfig(max_position_embeddings=8192, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024})
    assert model_len(10_000, llama3) == model_len(None, llama3) == 8193


def test_input_named_otherwise_on_resume_keeps_the_caches_names(tiny_model_dir, tmp_path,
                                                                 monkeypatch):
    """A resume (or another shard) that names the same input otherwise (an absolute path
    where the first run gave a relative one) wrote its rows under its own spelling: the
    `file` column and the rejects list held two names for one file, and the cache was not
    the uninterrupted run's."""
    rows = [dict(DEMO_ROWS[i % 4], id=f"r{i}") for i in range(20)]
    rows[13] = {"id": "bad", "prompt": "q"}  # (a rejected row in the second shard's parts)
    write_jsonl(tmp_path / "rows.jsonl", rows[:16])
    write_jsonl(tmp_path / "more.jsonl", [*rows[16:], dict(DEMO_ROWS[0], id="r2")])
    monkeypatch.chdir(tmp_path)
    names = ["rows.jsonl", "more.jsonl"]
    precompute(tiny_model_dir, names, "whole", on_bad="skip")
    precompute(tiny_model_dir, names, "shared", shard="0/2", on_bad="skip")
    monkeypatch.chdir(tmp_path.parent)  # the same files, named from elsewhere
    done = precompute(tiny_model_dir, [str(tmp_path / name) for name in names],
                      tmp_path / "shared", shard="1/2", on_bad="skip")
    assert done.complete and done.rows_rejected == 2
    assert list(iter_rows(tmp_path / "shared")) == list(iter_rows(tmp_path / "whole"))
    assert {row["file"] for row in iter_rows(tmp_path / "shared")} == set(names)
    rejects = [json.loads(line) for line in
               (tmp_path / "shared" / "_rejects.jsonl").read_text().splitlines()]
    assert [(reject["file"], reject["reason"].split(" (")[0]) for reject in rejects] == [
        ("rows.jsonl", "missing"), ("more.jsonl", "duplicate id 'r2'")]
    assert rejects[1]["reason"] == "duplicate id 'r2' (first on rows.jsonl, line 3)"
    assert read_metadata(tmp_path / "shared")["source_files"] == names
