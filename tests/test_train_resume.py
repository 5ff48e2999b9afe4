"""Training checkpoints and resume, the step-0 guard, and stale or broken caches refused."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import minorsft.train as train_module
from minorsft.cache import CacheError, iter_rows
from minorsft.checkpoints import TrainingInterrupted, list_checkpoints
from minorsft.cli import app
from minorsft.precompute import PrecomputeConfig, run_precompute
from minorsft.train import TrainConfig, run_train

from .conftest import (
    as_killed_after,
    build_tiny_model,
    build_tiny_tokenizer,
    demo_rows,
    precompute_rows,
    run_command,
)

TIMING = {"tokens_per_s", "rank_tokens_per_s", "step_seconds", "elapsed", "peak_rss_gib"}


# One torch thread: these tests run many tiny forward passes, where a second thread only adds
# contention (measured ~40x slower matmuls on a loaded 2-core machine).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tiny_model_dir, demo_jsonl, tmp_path):
    out = tmp_path / "ref.parquet"
    run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(demo_jsonl),
                                    out=str(out), part_rows=8, max_batch_tokens=256))
    return out


def config(cache, output, **overrides):
    settings = dict(cache=str(cache), output=str(output), batch_size=4, micro_batch_size=2,
                    lr=1e-3, max_steps=4, shuffle_buffer=8)
    return TrainConfig(**{**settings, **overrides})


def metrics(output):
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def interrupt_after(monkeypatch, steps: int):
    """Send this process a real SIGINT (Ctrl-C) after `steps` optimizer steps."""
    real_step, done = train_module.train_step, []

    def step_then_interrupt(*args):
        result = real_step(*args)
        done.append(1)
        if len(done) == steps:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(train_module, "train_step", step_then_interrupt)


def weights(output):
    from safetensors.torch import load_file

    return load_file(output / "model.safetensors")


def test_ctrl_c_checkpoint_then_resume_equals_uninterrupted(cache, tmp_path, monkeypatch):
    run_train(config(cache, tmp_path / "a"))  # uninterrupted: 4 steps
    interrupt_after(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted) as stopped:
        run_train(config(cache, tmp_path / "b"))
    monkeypatch.undo()
    assert stopped.value.step == 2
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [2]
    assert len(metrics(tmp_path / "b")) == 2
    with monkeypatch.context() as patched, pytest.raises(
            ValueError, match="holds checkpoints of an earlier run"):
        # refused before the model loads (minutes for a 7B one), not after
        patched.setattr("minorsft.train.load_model", lambda *a, **k: pytest.fail("loaded"))
        run_train(config(cache, tmp_path / "b"))
    with pytest.raises(ValueError, match="lr: checkpoint 0.001, this run 0.002"):
        run_train(config(cache, tmp_path / "b", lr=2e-3, resume=True))
    before = [json.loads(line)["elapsed"]
              for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    history = run_train(config(cache, tmp_path / "b", resume=True))
    assert [m["step"] for m in history] == [2, 3]
    assert metrics(tmp_path / "b") == metrics(tmp_path / "a")  # appended, equal to the end
    # `elapsed` goes on from the checkpoint's step (it restarted from 0)
    elapsed = [json.loads(line)["elapsed"]
               for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert elapsed[:2] == before and elapsed == sorted(elapsed) and elapsed[2] > before[-1]
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])  # with it, two groups: norms apart
def test_bf16_resume_continues_from_the_fp32_master_weights(cache, tmp_path, monkeypatch,
                                                           weight_decay):
    # fp32 cache, bf16 training: no step-0 check
    bf16 = dict(dtype="bfloat16", step0_check=False, weight_decay=weight_decay)
    history = run_train(config(cache, tmp_path / "a", **bf16))
    assert len(history) == 4
    interrupt_after(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        run_train(config(cache, tmp_path / "b", **bf16))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="master_weights: checkpoint True, this run False"):
        run_train(config(cache, tmp_path / "b", resume=True, master_weights=False, **bf16))
    run_train(config(cache, tmp_path / "b", resume=True, **bf16))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(v.dtype == torch.bfloat16 for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)  # the copies resumed, not re-rounded


def test_a_weight_decay_checkpoint_of_one_group_is_refused_with_the_reason(cache, tmp_path):
    """minorsft < 0.4.1 put every parameter in one group (norm gains decayed too); torch's own
    error about group counts said nothing of why."""
    output = tmp_path / "run"
    run_train(config(cache, output, weight_decay=0.1, save_every=2))
    run = as_killed_after(output, 2)
    path = run / "checkpoints" / "step-2" / "optimizer.pt"
    state = torch.load(path, weights_only=True)
    groups = state["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    state["param_groups"] = [{**groups[0], "params": [i for g in groups for i in g["params"]]}]
    torch.save(state, path)
    with pytest.raises(ValueError, match="Before 0.4.1, --weight-decay decayed biases and norm"):
        run_train(config(cache, run, weight_decay=0.1, save_every=2, resume=True))


def test_a_damaged_checkpoint_is_named_with_the_way_on(cache, tmp_path, monkeypatch):
    """A checkpoint file cut short (a full disk) or overwritten was safetensors' or torch's
    traceback on --resume (torch's advising weights_only=False)."""
    output = tmp_path / "run"
    run_train(config(cache, output, save_every=1))
    run = as_killed_after(output, 4)  # (step-3 and step-4 kept)
    newest = run / "checkpoints" / "step-4"
    # memory that runs out, or a file this user may not read, is no damage: never "delete it"
    real_load = torch.load
    for failure in (torch.OutOfMemoryError("CUDA out of memory"), PermissionError(13, "denied")):
        def failing_load(*args, failure=failure, **kwargs):
            raise failure

        monkeypatch.setattr(torch, "load", failing_load)
        with pytest.raises(type(failure)):
            run_train(config(cache, run, save_every=1, resume=True))
    monkeypatch.setattr(torch, "load", real_load)
    with (newest / "model.safetensors").open("r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(ValueError) as caught:
        run_train(config(cache, run, save_every=1, resume=True))
    message = str(caught.value)
    assert f"{newest / 'model.safetensors'}: cannot read it (" in message
    assert "is damaged: delete it to resume from the one before, step-3" in message
    shutil.rmtree(newest)
    (run / "checkpoints" / "step-3" / "optimizer.pt").write_text("garbage")
    with pytest.raises(ValueError, match=r"optimizer.pt: cannot read it \(UnpicklingError") \
            as caught:
        run_train(config(cache, run, save_every=1, resume=True))
    assert "there is no earlier one" in str(caught.value)
    assert "weights_only=False" not in str(caught.value)


def test_a_checkpoint_without_its_trainer_state_is_said_and_written_anew(cache, tmp_path):
    """Passed over in silence, and never written again: the save of that step saw the folder
    and skipped it."""
    import io

    output = tmp_path / "run"
    run_train(config(cache, output, save_every=1))
    expected = metrics(output)
    run = as_killed_after(output, 4)
    (run / "checkpoints" / "step-4" / "trainer_state.json").unlink()
    said = io.StringIO()
    run_train(config(cache, run, save_every=1, resume=True), Console(file=said, width=300))
    assert (f"note: {run / 'checkpoints' / 'step-4'} has no trainer_state.json, so it is no "
            "whole checkpoint: resuming from step-3") in said.getvalue()
    assert (run / "checkpoints" / "step-4" / "trainer_state.json").exists()
    assert metrics(run) == expected


def test_a_second_ctrl_c_says_where_resume_goes_on(cache, tmp_path, monkeypatch):
    """It stopped at once, as it should, but in silence: no word of what was saved."""
    real_step, done = train_module.train_step, []

    def step_then_two_interrupts(*args):
        result = real_step(*args)
        done.append(1)
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(train_module, "train_step", step_then_two_interrupts)
    output = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--cache", str(cache), "--output", str(output),
                                      "--batch-size", "4", "--micro-batch-size", "2",
                                      "--max-steps", "4", "--save-every", "1"])
    assert result.exit_code == 130, result.output
    text = " ".join(result.output.split())
    assert "stopped at once: no checkpoint was saved now; --resume continues from step 1" in text


def test_periodic_saves_keep_the_newest_and_a_failed_save_keeps_the_previous(
        cache, tmp_path, monkeypatch):
    import safetensors.torch

    run_train(config(cache, tmp_path / "a"))
    real_save, calls = safetensors.torch.save_file, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_second)
    with pytest.raises(OSError, match="No space left"):
        run_train(config(cache, tmp_path / "b", save_every=1))
    monkeypatch.undo()
    folder = tmp_path / "b" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["step-1"]  # no half-written step-2
    history = run_train(config(cache, tmp_path / "b", save_every=1, resume=True))
    assert [m["step"] for m in history] == [1, 2, 3]
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [3, 4]  # keep_checkpoints=2
    assert metrics(tmp_path / "b") == metrics(tmp_path / "a")
    again = run_train(config(cache, tmp_path / "b", save_every=1, resume=True))
    assert again == []  # already at the last step


def test_sigint_to_a_real_train_process_saves_a_checkpoint(cache, tmp_path):
    output = tmp_path / "run"
    command = [sys.executable, "-m", "minorsft", "train", "--cache", str(cache), "--output",
               str(output), "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3",
               "--max-steps", "400"]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="250")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    log = output / "metrics.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and log.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr
    ((step, path),) = list_checkpoints(output)
    assert 1 <= step < 400 and (path / "optimizer.pt").exists()
    assert len(metrics(output)) == step


SIGNAL_DURING_SAVE = """
import os, signal, sys
import minorsft.train as train
real_save = train.save
def save(state, config):
    os.kill(os.getpid(), signal.SIG{name})  # as if it came while a large model was written
    return real_save(state, config)
train.save = save
from minorsft.cli import app
sys.argv = ["minorsft", *sys.argv[1:]]
app()
"""


@pytest.mark.parametrize("name", ["TERM", "INT"])
def test_a_signal_during_the_final_save_waits_for_it(cache, tmp_path, name):
    """Under the default handlers the save died half way: no run_config.json, no checkpoint of
    the last steps, and a folder that neither --resume nor --overwrite would take."""
    output = tmp_path / "run"
    command = [sys.executable, "-c", SIGNAL_DURING_SAVE.format(name=name), "train", "--cache",
               str(cache), "--output", str(output), "--batch-size", "4", "--micro-batch-size",
               "2", "--max-steps", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="250")
    done = run_command(command, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "the stop request came while the model was being saved" in done.stderr
    assert json.loads((output / "run_config.json").read_text())["total_steps"] == 2
    assert len(metrics(output)) == 2


def test_a_run_that_died_while_saving_is_trained_again_with_overwrite_or_resume(cache,
                                                                               tmp_path):
    """Its model files without run_config.json were refused as files of no minorsft run, and
    the message said to delete them, even with --overwrite."""
    output = tmp_path / "run"
    run_train(config(cache, output, max_steps=2))
    (output / "run_config.json").unlink()  # as a kill between the model and the run config
    with pytest.raises(ValueError, match="holds a run that did not finish saving"):
        run_train(config(cache, output, max_steps=2))
    expected = metrics(output)
    for option in ("overwrite", "resume"):
        assert len(run_train(config(cache, output, max_steps=2, **{option: True}))) == 2
        assert metrics(output) == expected
        (output / "run_config.json").unlink()
    # trained again as another kind of run, it leaves none of the dead run's model files
    pytest.importorskip("peft")
    run_train(config(cache, output, max_steps=2, resume=True, lora_r=4))
    assert not (output / "model.safetensors").exists()
    assert (output / "adapter_model.safetensors").exists()
    (output / "run_config.json").unlink()
    # a folder of model files without metrics is still no minorsft run's, and so is one with
    # metrics of something else: --resume removes nothing there
    (output / "metrics.jsonl").write_text('{"epoch": 1, "accuracy": 0.5}\n')
    (output / "model_init.safetensors").write_text("the user's")
    for option in ("resume", "overwrite"):
        with pytest.raises(ValueError, match="but no minorsft run"):
            run_train(config(cache, output, max_steps=2, **{option: True}))
    assert (output / "adapter_model.safetensors").exists()
    assert (output / "model_init.safetensors").read_text() == "the user's"


def test_fingerprint_mismatch_names_the_field_and_the_fix(cache, tmp_path, capsys):
    from rich.console import Console

    other = tmp_path / "other-model"
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(CacheError, match=r"fingerprint.weights: cache has '[0-9a-f]+', this run"
                                         r" has '[0-9a-f]+'\n    -> the reference log-probs"):
        run_train(config(cache, tmp_path / "run", model=str(other)))
    # Accepted on purpose: the step-0 check reports how far apart they are, without stopping.
    history = run_train(config(cache, tmp_path / "run", model=str(other), allow_mismatch=True,
                               max_steps=1), console=Console(file=sys.stderr, width=300))
    assert "warning (--allow-mismatch): step-0 check failed" in capsys.readouterr().err
    assert abs(history[0]["m_theta"]) > 1e-3


def test_step0_guard_stops_a_cache_with_wrong_numbers(cache, tmp_path):
    """Fingerprints match but the values do not (a faulty engine, a mislabelled dtype)."""
    for part in sorted(cache.glob("part-*.parquet")):
        rewrite_part(part, lambda t: t.set_column(
            t.schema.get_field_index("ref_logps"), "ref_logps",
            pa.compute.add(t["ref_logps"], pa.compute.multiply(
                t["num_tokens"].cast(pa.float64()), 0.01))))  # +0.01 nats per token
    with pytest.raises(CacheError, match=r"step-0 check failed.*mean \|r\|/m 0.01 ") as caught:
        run_train(config(cache, tmp_path / "run"))
    assert "--no-step0-check" in str(caught.value)
    assert re.search(r"\(id '[^']+', input \S+\.jsonl, line \d+: policy", str(caught.value))
    history = run_train(config(cache, tmp_path / "run", step0_tolerance=0.02, max_steps=1))
    assert history[0]["m_theta"] == pytest.approx(-0.01, abs=1e-4)
    history = run_train(config(cache, tmp_path / "run2", step0_check=False, max_steps=1))
    assert len(history) == 1


def test_step0_guard_passes_on_the_right_cache_and_measures(cache, tmp_path, capsys):
    from rich.console import Console

    history = run_train(config(cache, tmp_path / "run", max_steps=1),
                        console=Console(file=sys.stderr, width=200))
    assert "step-0 check on 8 rows: step-0 m_theta" in capsys.readouterr().err
    assert abs(history[0]["m_theta"]) < 1e-5


def rewrite_part(path, transform):
    """Rewrite a cache part in place with `transform(table)`, keeping its metadata."""
    table = pq.read_table(path)
    metadata = table.schema.metadata
    table = transform(table)
    pq.write_table(table.replace_schema_metadata(metadata), path)


def test_nan_missing_parts_and_schema_mismatch_are_refused(cache, tmp_path):
    part = cache / "part-00001.parquet"
    original = part.read_bytes()

    def nan_row(table):
        values = table["ref_logps"].to_pylist()
        values[3] = float("nan")
        return table.set_column(table.schema.get_field_index("ref_logps"),
                                table.schema.field("ref_logps"), pa.array(values, pa.float64()))

    rewrite_part(part, nan_row)
    with pytest.raises(CacheError, match=r"1 row\(s\) where ref_logps is not finite, first id"):
        run_train(config(cache, tmp_path / "run"))
    # eval showed an unexplained "n/a", verify a nan drift, cache info a nan mean unflagged
    from minorsft.eval import EvalConfig, run_eval
    from minorsft.verify import VerifyConfig, run_verify

    model = json.loads((cache / "_manifest.json").read_text())["metadata"]["model"]
    with pytest.raises(CacheError, match=r"where ref_logps is not finite"):
        run_eval(EvalConfig(model=model, reference=str(cache)))
    with pytest.raises(CacheError, match=r"where ref_logps is not finite"):
        run_verify(VerifyConfig(cache=str(cache)))
    info = CliRunner().invoke(app, ["cache", "info", str(cache)])
    assert info.exit_code == 0, info.output
    assert "status: CORRUPT (train, eval and verify refuse it)" in " ".join(info.output.split())
    assert "where ref_logps is not finite" in " ".join(info.output.split())
    rewrite_part(part, lambda t: t.set_column(
        t.schema.get_field_index("ref_logps"), "ref_logps", t["ref_logps"].cast(pa.float32())))
    with pytest.raises(CacheError, match="column 'ref_logps' is float, expected double"):
        run_train(config(cache, tmp_path / "run"))
    part.unlink()
    with pytest.raises(CacheError, match="part 1 is listed in the manifest but missing"):
        run_train(config(cache, tmp_path / "run"))
    part.write_bytes(original)
    rewrite_part(part, lambda t: t.slice(0, 5))
    with pytest.raises(CacheError, match="has 5 rows, the manifest says 8"):
        run_train(config(cache, tmp_path / "run"))



@pytest.mark.parametrize(("edit", "message"), [
    # m is the losses' 1/m: a foreign or hand-edited cache must not train with the wrong one
    (lambda row: row.update(num_tokens=row["num_tokens"] + 1),
     "num_tokens is not the number of answer tokens in answer_mask"),
    (lambda row: row.update(answer_mask=row["answer_mask"][:-1]),
     "input_ids and answer_mask differ in length"),
    (lambda row: row.update(answer_mask=[True, *row["answer_mask"][1:]],
                            num_tokens=row["num_tokens"] + 1),
     "answer_mask is set at the first token"),
])
def test_rows_the_losses_would_get_wrong_are_refused(cache, tmp_path, edit, message):
    def edit_row(table):
        rows = table.to_pylist()
        edit(rows[2])
        return pa.Table.from_pylist(rows, schema=table.schema)

    rewrite_part(cache / "part-00001.parquet", edit_row)
    with pytest.raises(CacheError, match=rf"1 row\(s\) where {message}, first id"):
        run_train(config(cache, tmp_path / "run"))

def test_ddp_checkpoint_resumes_in_one_process(cache, tmp_path):
    """torchrun, 2 CPU processes (gloo): rank 0 writes the checkpoint; it resumes anywhere."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    multi = tmp_path / "multi"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(port), "-m", "minorsft", "train", "--cache", str(cache),
               "--output", str(multi), "--batch-size", "4", "--micro-batch-size", "1",
               "--lr", "1e-3", "--max-steps", "4", "--save-every", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = run_command(command, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(multi)] == [2, 4]
    resumed = as_killed_after(multi, 2, copy_to=tmp_path / "resumed")
    history = run_train(config(cache, resumed, micro_batch_size=2, resume=True, save_every=2,
                               shuffle_buffer=TrainConfig.shuffle_buffer))
    assert [m["step"] for m in history] == [2, 3]
    expected, got = metrics(multi), metrics(resumed)
    assert len(got) == 4 and got[:2] == expected[:2]  # kept as they were
    for one, two in zip(expected[2:], got[2:], strict=True):
        for key in ("loss", "m_theta", "coefficient", "grad_norm", "lr", "tokens"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    a, b = weights(multi), weights(resumed)
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-4, atol=1e-5)


def fsdp_torchrun(cache, output, *extra, fails: str | None = None):
    """`minorsft train` under torchrun, 2 CPU processes (gloo), --strategy fsdp, 4 steps
    (with `fails`: it must fail with that text in its error output)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(port), "-m", "minorsft", "train", "--cache", str(cache),
               "--output", str(output), "--strategy", "fsdp", "--batch-size", "4",
               "--micro-batch-size", "1", "--lr", "1e-3", "--max-steps", "4",
               "--save-every", "2", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = run_command(command, timeout=300, env=env)
    if fails is not None:
        assert result.returncode != 0 and fails in result.stderr + result.stdout
        return
    assert result.returncode == 0, result.stderr[-3000:]


def assert_continues(expected_run, resumed_run, steps, rel=1e-4, atol=1e-5):
    """The resumed run's metrics (of `steps`) and final weights equal the uninterrupted one's."""
    expected = {m["step"]: m for m in metrics(expected_run)}
    got = {m["step"]: m for m in metrics(resumed_run)}
    assert sorted(got) == sorted(expected) == list(range(4))
    for step in steps:
        for key in ("loss", "m_theta", "coefficient", "grad_norm", "lr", "tokens"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=rel, abs=1e-6), key
    a, b = weights(expected_run), weights(resumed_run)
    assert set(a) == set(b)
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=rel, atol=atol)


def test_fsdp_checkpoint_resumes_under_torchrun_and_in_one_process(cache, tmp_path):
    """FSDP2, 2 CPU processes: the gathered checkpoint resumes under torchrun to the same run,
    and in one process too (its name-keyed optimizer state converted). With weight decay, so
    that the optimizer has two parameter groups (biases and norm gains undecayed)."""
    whole = tmp_path / "whole"
    decay = ("--weight-decay", "0.1")
    fsdp_torchrun(cache, whole, *decay)
    assert [s for s, _ in list_checkpoints(whole)] == [2, 4]
    resumed = as_killed_after(whole, 2, copy_to=tmp_path / "resumed")
    fsdp_torchrun(cache, resumed, "--resume", *decay)
    assert_continues(whole, resumed, range(4))
    alone = as_killed_after(whole, 2, copy_to=tmp_path / "alone")
    history = run_train(config(cache, alone, resume=True, save_every=2, weight_decay=0.1,
                               shuffle_buffer=TrainConfig.shuffle_buffer))
    assert [m["step"] for m in history] == [2, 3]
    assert_continues(whole, alone, (2, 3))


def test_fsdp_bf16_checkpoint_resumes_in_one_process_on_master_weights(cache, tmp_path):
    """FSDP's bf16 run (fp32 weights, bf16 compute) goes on in one process as a bf16 run on
    fp32 master weights. Not exactly: FSDP reduces gradients in fp32, one process keeps them
    in bf16. Both save a bf16 model (FSDP's used to be its fp32 weights: twice the size)."""
    bf16 = ("--dtype", "bfloat16", "--no-step0-check")
    whole = tmp_path / "whole"
    fsdp_torchrun(cache, whole, *bf16)
    alone = as_killed_after(whole, 2, copy_to=tmp_path / "alone")
    run_train(config(cache, alone, resume=True, save_every=2, dtype="bfloat16",
                     step0_check=False, shuffle_buffer=TrainConfig.shuffle_buffer))
    expected, got = metrics(whole), metrics(alone)
    for one, two in zip(expected[2:], got[2:], strict=True):
        for key in ("loss", "m_theta", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=1e-2), key
    a, b = weights(whole), weights(alone)
    for name, value in a.items():
        assert value.dtype == b[name].dtype == torch.bfloat16
        torch.testing.assert_close(b[name].float(), value.float(), rtol=1e-2, atol=1e-3)
    for run in (whole, alone):
        assert json.loads((run / "config.json").read_text())["dtype"] == "bfloat16"


def test_one_process_checkpoint_resumes_under_fsdp(cache, tmp_path):
    """A checkpoint written in one process (torch's index-keyed optimizer state) continues
    under torchrun with --strategy fsdp as the run would have continued."""
    whole = tmp_path / "whole"
    run_train(config(cache, whole, save_every=2, shuffle_buffer=TrainConfig.shuffle_buffer))
    resumed = as_killed_after(whole, 2, copy_to=tmp_path / "resumed")
    fsdp_torchrun(cache, resumed, "--resume")
    assert_continues(whole, resumed, (2, 3))
    # a pure bf16 run has no fp32 weights to hand over: refused, saying why
    pure = dict(dtype="bfloat16", step0_check=False, master_weights=False)
    run_train(config(cache, tmp_path / "pure", save_every=2, **pure))
    as_killed_after(tmp_path / "pure", 2)
    fsdp_torchrun(cache, tmp_path / "pure", "--resume", "--dtype", "bfloat16",
                  "--no-step0-check", "--no-master-weights",
                  fails="FSDP always updates fp32 weights")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])  # with it, two groups: norms apart
def test_a_bf16_run_resumes_from_fsdps_kind_of_checkpoint(cache, tmp_path, weight_decay):
    """What FSDP writes for a bf16 run: fp32 weights, name-keyed optimizer state, no master
    weights (FSDP's policy keeps its own). Resumed in one process with --dtype bfloat16 (on
    master weights, the default), it continues the run exactly: the fp32 weights become the
    master weights. The checkpoint here is a one-process bf16 checkpoint rewritten that way."""
    from safetensors.torch import load_file, save_file

    from minorsft.optim import optimizer_order

    bf16 = dict(dtype="bfloat16", step0_check=False, save_every=2, weight_decay=weight_decay)
    whole = tmp_path / "whole"
    run_train(config(cache, whole, **bf16))
    resumed = as_killed_after(whole, 2, copy_to=tmp_path / "resumed")
    step = resumed / "checkpoints" / "step-2"
    optimizer = torch.load(step / "optimizer.pt", weights_only=True)
    names = list(load_file(step / "model.safetensors"))
    model = build_tiny_model(build_tiny_tokenizer())  # the run's parameter order
    order = [name for name, _ in optimizer_order(list(model.named_parameters()), weight_decay)
             if name in names]  # the optimizer's numbering
    masters = dict(zip(order, optimizer.pop("master_weights"), strict=True))  # all bf16
    save_file({name: value.contiguous() for name, value in masters.items()},
              step / "model.safetensors")
    torch.save({"state": {order[i]: value for i, value in optimizer["state"].items()},
                "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                 for group in optimizer["param_groups"]]}, step / "optimizer.pt")
    trainer_state = json.loads((step / "trainer_state.json").read_text())
    trainer_state["optimizer_format"] = "by-name"
    trainer_state["settings"]["master_weights"] = False  # as an FSDP run records it
    (step / "trainer_state.json").write_text(json.dumps(trainer_state))
    run_train(config(cache, resumed, resume=True, **bf16))
    a, b = weights(whole), weights(resumed)
    assert all(v.dtype == torch.bfloat16 for v in b.values())
    assert all(torch.equal(a[k], b[k]) for k in a)  # continued from the fp32 values
    assert metrics(resumed) == metrics(whole)


def test_an_output_holding_a_run_is_refused_unless_overwritten(cache, tmp_path):
    """A rerun into a finished run's folder silently replaced its model and metrics."""
    output = tmp_path / "run"
    run_train(config(cache, output, max_steps=2))
    model_before = (output / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="holds a finished run"):
        run_train(config(cache, output, max_steps=2, loss="sft"))
    assert (output / "model.safetensors").read_bytes() == model_before
    assert json.loads((output / "run_config.json").read_text())["config"]["loss"] == "minorsft"
    # --overwrite removes the earlier run only once the new one has loaded and passed its
    # checks: a mistake found on the way (here an adapter target no module has) kept nothing
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match="nope"):
        run_train(config(cache, output, max_steps=2, lora_r=4, lora_target_modules="nope",
                         overwrite=True))
    assert (output / "model.safetensors").read_bytes() == model_before
    assert (output / "run_config.json").exists() and len(metrics(output)) == 2
    # --overwrite replaces it, checkpoints of the earlier run included
    (output / "checkpoints" / "step-1").mkdir(parents=True)
    run_train(config(cache, output, max_steps=1, loss="sft", overwrite=True))
    assert json.loads((output / "run_config.json").read_text())["config"]["loss"] == "sft"
    assert len(metrics(output)) == 1 and not (output / "checkpoints").exists()
    import shutil

    other_cache = tmp_path / "held"  # (an --eval-cache, say: a model written among its parts)
    shutil.copytree(cache, other_cache)
    for wrong, message in ((cache, "is the cache"), (tmp_path / "file.txt", "is a file"),
                           (tmp_path / "file.txt" / "run", "cannot create the folder"),
                           (other_cache, "is a minorsft cache .*: train would write its model")):
        (tmp_path / "file.txt").write_text("x")
        with pytest.raises(ValueError, match=message):
            run_train(config(cache, wrong))
    assert sorted(path.name for path in other_cache.iterdir()) == \
        sorted(path.name for path in cache.iterdir())


def test_a_second_train_on_the_same_output_is_refused_while_the_first_runs(cache, tmp_path):
    """Nothing stopped it: a job restarted with --resume while the first still ran pruned the
    first's checkpoints from under it (a traceback there) and both wrote the model."""
    from minorsft.folder_lock import folder_lock
    from minorsft.train import TRAIN_LOCK

    output = tmp_path / "run"
    output.mkdir()
    with folder_lock(output, TRAIN_LOCK, wait=False) as held:  # (as a running train holds it)
        assert held
        with pytest.raises(ValueError, match="another minorsft train is writing this folder"):
            run_train(config(cache, output, max_steps=1, resume=True))
    (output / TRAIN_LOCK).unlink()  # (the test made it; a train removes its own)
    run_train(config(cache, output, max_steps=1))
    assert (output / "run_config.json").exists() and not (output / TRAIN_LOCK).exists()
    # a run refused before training leaves no folder behind
    with pytest.raises(CacheError):
        run_train(config(tmp_path / "no-cache", tmp_path / "refused", max_steps=1))
    assert not (tmp_path / "refused").exists()


def test_overwriting_a_full_run_with_lora_leaves_no_model_config_behind(cache, tmp_path):
    """--overwrite kept the full run's config.json beside the new adapters: the folder then
    looked like a model without weights, and loading it ended in transformers' traceback."""
    from minorsft.models import ModelError, load_model, resolve_model

    output = tmp_path / "run"
    run_train(config(cache, output, max_steps=1))
    assert (output / "config.json").exists() and (output / "generation_config.json").exists()
    run_train(config(cache, output, max_steps=1, lora_r=4, overwrite=True))
    assert not (output / "config.json").exists()
    assert not (output / "generation_config.json").exists()
    with pytest.raises(ModelError, match="LoRA adapters only"):
        resolve_model(str(output))
    # a folder such a run of minorsft <= 0.3.0 left: the adapters are still recognised
    (output / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="LoRA adapters only"):
        resolve_model(str(output))
    # and a model folder without weights, or with half a weights file, is one line, not
    # transformers' or safetensors' traceback
    (output / "adapter_config.json").unlink()
    with pytest.raises(ModelError, match="could not load the model"):
        load_model(resolve_model(str(output)), torch.float32, torch.device("cpu"))
    full = tmp_path / "full"
    run_train(config(cache, full, max_steps=1))
    weights = (full / "model.safetensors").read_bytes()
    (full / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ModelError, match="could not load the model"):
        load_model(resolve_model(str(full)), torch.float32, torch.device("cpu"))


def test_resume_at_the_last_step_trains_nothing_and_keeps_the_run(cache, tmp_path, capsys):
    output = tmp_path / "run"
    run_train(config(cache, output, max_steps=2, save_every=2))
    before = metrics(output)
    capsys.readouterr()
    assert run_train(config(cache, output, max_steps=2, save_every=2, resume=True)) == []
    err = capsys.readouterr().err
    assert "nothing to do" in err and "nan" not in err
    assert metrics(output) == before


def test_a_cache_from_before_the_answer_span_fix_gets_a_note(cache, tmp_path, capsys):
    from minorsft.cache import update_metadata

    update_metadata(cache, {"minorsft_version": "0.1.0"})
    run_train(config(cache, tmp_path / "run", max_steps=1))
    err = " ".join(capsys.readouterr().err.split())
    assert "written by minorsft 0.1.0" in err and "run precompute again" in err
    assert "0.2.0 fixed" in err and "0.4.0 fixed" in err
    note = train_module._old_answer_span_note("0.3.3")  # only the later fix applies
    assert "0.4.0 fixed" in note and "0.2.0" not in note
    assert train_module._old_answer_span_note(train_module.__version__) is None
    assert train_module._old_answer_span_note(None) is None  # nothing recorded: no guess


# --- what a review of the training stage found -------------------------------------------------

def test_epochs_run_every_planned_step_and_no_step_repeats_a_sample(cache, tmp_path):
    """16 rows, batch 6, 2 epochs: 3 steps per epoch (6, 6, 4). One stream over both epochs
    ran 6 + 6 + 6 + 6 + 4 = 5 batches of 6 planned, one of them holding rows of both epochs."""
    seen = []
    real_step = train_module.train_step

    def record(state, config, rows):
        seen.append([row["id"] for row in rows])
        return real_step(state, config, rows)

    train_module.train_step, saved = record, train_module.train_step
    try:
        history = run_train(config(cache, tmp_path / "run", max_steps=None, epochs=2,
                                   batch_size=6, micro_batch_size=2))
    finally:
        train_module.train_step = saved
    assert len(history) == 6 and [len(ids) for ids in seen] == [6, 6, 4, 6, 6, 4]
    assert all(len(set(ids)) == len(ids) for ids in seen)
    rows = sorted(row["id"] for row in iter_rows(cache))
    assert sorted(sum(seen[:3], [])) == rows and sorted(sum(seen[3:], [])) == rows
    assert history[-1]["lr"] > 0 and metrics(tmp_path / "run")[-1]["step"] == 5


def test_output_that_holds_the_model_or_another_model_is_refused(cache, tiny_model_dir,
                                                                  tmp_path):
    """--overwrite deleted the weights of the model it was about to train (--output = --model)."""
    import shutil

    model = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, model)
    before = (model / "model.safetensors").read_bytes()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="holds the model being trained"):
            run_train(config(cache, model, model=str(model), overwrite=overwrite,
                             allow_mismatch=True))
        # a previous run's merged model inside --output, which --overwrite would remove
        with pytest.raises(ValueError, match="holds the model being trained"):
            run_train(config(cache, tmp_path, model=str(model), overwrite=overwrite,
                             allow_mismatch=True))
        with pytest.raises(ValueError, match="holds .*model.safetensors but no minorsft run"):
            run_train(config(cache, model, overwrite=overwrite))  # someone else's model folder
    assert (model / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("save_every", [None, 2])
def test_resume_of_a_finished_run_does_nothing(cache, tmp_path, capsys, save_every):
    """A job script passes --resume on every start; after the last, it retrained from step 0
    (no checkpoints), or the steps after the last checkpoint (--save-every 2 of 3 steps)."""
    output = tmp_path / "run"
    run_train(config(cache, output, max_steps=3, save_every=save_every))
    logged = (output / "metrics.jsonl").read_text()
    model = (output / "model.safetensors").stat().st_mtime_ns
    assert run_train(config(cache, output, max_steps=3, save_every=save_every, resume=True),
                     console=Console(file=sys.stderr, width=200)) == []
    assert "nothing to do" in capsys.readouterr().err
    assert (output / "metrics.jsonl").read_text() == logged
    assert (output / "model.safetensors").stat().st_mtime_ns == model


def test_resume_of_a_finished_run_refuses_another_cache_or_model(cache, tiny_model_dir,
                                                                  tmp_path, capsys):
    """Both said "nothing to do" and exited 0: --resume of a finished run compared only the
    settings, where a checkpoint's resume also compares the cache and the model."""
    import shutil

    output = tmp_path / "run"
    run_train(config(cache, output, max_steps=2))
    other = tmp_path / "other"
    other.mkdir()
    other_cache = precompute_rows(str(tiny_model_dir), other, demo_rows(3))
    with pytest.raises(ValueError, match=r"other settings(.|\n)*cache rows: 16 -> 12"):
        run_train(config(other_cache, output, max_steps=2, resume=True))
    copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, copy)
    with pytest.raises(ValueError, match=f"model: {tiny_model_dir} -> {copy}"):
        run_train(config(cache, output, max_steps=2, resume=True, model=str(copy)))
    # the same run: its model named, and its dtype spelled as it trained ("auto" on the CPU)
    capsys.readouterr()
    assert run_train(config(cache, output, max_steps=2, resume=True, model=str(tiny_model_dir),
                            dtype="float32")) == []
    assert "nothing to do" in capsys.readouterr().err
    # a finished run needs no cache: a job script's --resume after the cache was cleaned away
    assert run_train(config(tmp_path / "gone.parquet", output, max_steps=2, resume=True)) == []
    assert "nothing to do" in capsys.readouterr().err
    # but a --model that is there and is no model is an error, as in any run
    from minorsft.models import ModelError

    with pytest.raises(ModelError, match="not a model folder"):
        run_train(config(cache, output, max_steps=2, resume=True, model=str(other)))


def test_resume_refuses_a_cache_of_other_rows_with_as_many_rows(cache, demo_jsonl,
                                                                 tiny_model_dir, tmp_path,
                                                                 monkeypatch, capsys):
    """Row count and model fingerprint agreed, so a cache of other answers (or the same rows
    cut by another --max-length) went on from a checkpoint silently: the run mixed two data
    sets. Its rows' content is compared too; the same cache elsewhere is the same run."""
    import shutil

    rows = [json.loads(line) for line in demo_jsonl.read_text().splitlines()]
    other = tmp_path / "other"
    other.mkdir()
    for row in rows:  # the same rows, one answer longer
        for key in ("response", "output"):
            if key in row:
                row[key] += " Yes."
    other_cache = precompute_rows(str(tiny_model_dir), other, rows)
    output = tmp_path / "run"
    interrupt_after(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        run_train(config(cache, output))
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"cache_content: checkpoint '\w+', this run '\w+' "
                                         r"\(the cache's rows or reference log-probs are not the "
                                         "run's: another --data, --max-length"):
        run_train(config(other_cache, output, resume=True))
    cut = tmp_path / "cut"
    cut.mkdir()
    # the run's own rows, half of them cut short (all 16 kept)
    cut_cache = precompute_rows(str(tiny_model_dir), cut, demo_rows(4), max_length=32)
    with pytest.raises(ValueError, match="cache_content: checkpoint"):
        run_train(config(cut_cache, output, resume=True))
    # the hash is the rows', whatever the parts and read batches (one column at a time)
    from minorsft.cache import content_hash, validate_values

    parted = tmp_path / "parted"
    parted.mkdir()
    parted_cache = precompute_rows(str(tiny_model_dir), parted, demo_rows(4), part_rows=5)
    assert content_hash(parted_cache, batch_rows=3) == validate_values(cache) \
        == content_hash(cache)
    moved = tmp_path / "moved.parquet"
    shutil.copytree(cache, moved)
    assert [m["step"] for m in run_train(config(moved, output, resume=True))] == [2, 3]
    # and a finished run: "nothing to do" with the other cache was as silent
    with pytest.raises(ValueError, match=r"other settings(.|\n)*cache content: '\w+' -> '\w+' "
                                         r"\(the cache's rows"):
        run_train(config(other_cache, output, resume=True))
    capsys.readouterr()
    assert run_train(config(moved, output, resume=True)) == []
    assert "nothing to do" in capsys.readouterr().err


def test_resume_refuses_other_lora_settings_and_takes_the_same_model_by_name(cache, tmp_path,
                                                                           monkeypatch):
    output = tmp_path / "run"
    lora = dict(lora_r=4, lora_alpha=8.0, max_steps=4)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        run_train(config(cache, output, **lora))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="lora_alpha: checkpoint 8.0, this run 128.0"):
        run_train(config(cache, output, resume=True, **{**lora, "lora_alpha": 128.0}))
    # --model naming the model the run defaulted to (the cache's) is the same run
    model_path = json.loads((output / "checkpoints" / "step-2" / "trainer_state.json")
                            .read_text())["settings"]["model"]
    assert len(run_train(config(cache, output, resume=True, model=model_path, **lora))) == 2


def test_a_line_cut_off_in_metrics_does_not_block_resume(cache, tmp_path, monkeypatch):
    output = tmp_path / "run"
    interrupt_after(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted):
        run_train(config(cache, output, save_every=2))
    monkeypatch.undo()
    with (output / "metrics.jsonl").open("a") as log:
        log.write('{"step": 3, "loss": 0.')  # a kill during the write
    # the interrupt saved step 3; take that checkpoint away to resume from step 2
    import shutil

    shutil.rmtree(output / "checkpoints" / "step-3")
    run_train(config(cache, output, resume=True, save_every=2))
    assert [m["step"] for m in metrics(output)] == [0, 1, 2, 3]


def test_an_empty_cache_and_impossible_attention_are_refused_in_one_line(cache, tmp_path):
    def no_rows(table):
        return table.slice(0, 0)

    with pytest.raises(ValueError, match="flex_attention trains only on CUDA"):
        run_train(config(cache, tmp_path / "flex", attention="flex_attention"))
    from minorsft.models import ModelError
    with pytest.raises(ModelError, match="needs a CUDA GPU and the flash_attn package"):
        run_train(config(cache, tmp_path / "flash", attention="flash_attention_2"))
    for part in sorted(cache.glob("part-*.parquet")):
        rewrite_part(part, no_rows)
    manifest = cache / "_manifest.json"
    body = json.loads(manifest.read_text())
    for entry in body["parts"].values():
        entry.update(rows_cached=0, answer_tokens=0)
    manifest.write_text(json.dumps(body))
    with pytest.raises(CacheError, match="the cache has no rows"):
        run_train(config(cache, tmp_path / "run", max_steps=3, step0_check=False))


def test_a_micro_batch_larger_than_the_batch_is_the_batch():
    assert TrainConfig(cache="c", output="o", batch_size=2, micro_batch_size=4
                       ).micro_batch_size == 2


def test_sigterm_after_ctrl_c_is_the_same_request_a_repeat_stops_at_once():
    """torchrun passes a terminal's Ctrl-C on to its workers as SIGTERM, which reached them
    beside the terminal's own SIGINT: taken as a second request, it stopped without saving."""
    from minorsft.checkpoints import StopRequest

    stop = StopRequest()
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGTERM, None)  # the same request, passed on
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)  # the user pressing Ctrl-C again


def test_a_signal_during_a_periodic_save_stops_at_that_checkpoint(cache, tmp_path,
                                                                  monkeypatch):
    """It ran one more step and saved again, which may not fit in torchrun's 30 s grace; and a
    save killed midway left its hidden staging folder for good."""
    from minorsft import checkpoints as checkpoints_module
    from minorsft.checkpoints import TrainingInterrupted

    stale = tmp_path / "run" / "checkpoints" / ".step-9.abcd"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("half")
    real_save = checkpoints_module.save_checkpoint

    def save_while_signalled(state, config, step):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(state, config, step)

    monkeypatch.setattr(train_module, "save_checkpoint", save_while_signalled)
    with pytest.raises(TrainingInterrupted) as caught:
        run_train(config(cache, tmp_path / "run", save_every=2, resume=True))
    assert caught.value.step == 2
    assert [line["step"] for line in metrics(tmp_path / "run")] == [0, 1]
    assert not stale.exists()


def test_a_repeated_sigterm_is_the_same_request():
    """A scheduler signals every process of a job and torchrun passes its own SIGTERM on: each
    worker got two, and the second stopped it without a checkpoint."""
    from minorsft.checkpoints import StopRequest

    stop = StopRequest()
    stop._handle(signal.SIGTERM, None)
    stop._handle(signal.SIGTERM, None)
    assert stop.requested


def test_ranks_resumed_in_another_world_size_draw_different_numbers(tmp_path):
    """They all took rank 0's RNG states: the same dropout masks on every rank."""
    from types import SimpleNamespace

    from minorsft.checkpoints import _restore_rng

    torch.save({"ranks": [{"torch": torch.get_rng_state(), "python": random.getstate(),
                           "cuda": []}]}, tmp_path / "rng.pt")  # a one-process checkpoint
    draws = []
    for rank in range(2):
        _restore_rng(tmp_path, SimpleNamespace(rank=rank, world_size=2))
        draws.append((torch.rand(4), random.random()))
    assert not torch.equal(draws[0][0], draws[1][0]) and draws[0][1] != draws[1][1]
    _restore_rng(tmp_path, SimpleNamespace(rank=1, world_size=2))  # and it is reproducible
    assert torch.equal(torch.rand(4), draws[1][0])


def test_value_checks_read_a_part_in_batches_and_count_across_them(cache):
    """validate_values reads `batch_rows` rows at a time (a part is never held whole); the
    count and the first bad row are the same as when reading it at once."""
    from minorsft.cache import validate_values

    def two_bad_rows(table):
        rows = table.to_pylist()
        for index in (2, 6):  # in the first and the third batch of 3 rows
            rows[index]["num_tokens"] += 1
        return pa.Table.from_pylist(rows, schema=table.schema)

    rewrite_part(cache / "part-00000.parquet", two_bad_rows)
    messages = []
    for batch_rows in (3, 8192):
        with pytest.raises(CacheError) as caught:
            validate_values(cache, batch_rows=batch_rows)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert "2 row(s) where num_tokens is not the number of answer tokens" in messages[0]


def test_a_checkpoint_naming_its_model_folder_relatively_still_matches(tmp_path, monkeypatch):
    """Checkpoints of 0.3.0 recorded a model folder as given (relative); resolve_model now gives
    it absolute, and --resume must still take them for the same model."""
    from minorsft.checkpoints import _same_folder
    from minorsft.models import resolve_model

    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    loaded = resolve_model("models/tiny")
    assert loaded == str((tmp_path / "models" / "tiny").resolve())
    assert _same_folder("models/tiny", loaded)
    assert _same_folder("./models/../models/tiny", loaded)
    assert not _same_folder("models/other", loaded)
    assert not _same_folder(None, loaded)


def _copy_with(model_dir, target, tokenizer=None, change=None):
    """A copy of the model folder, with another tokenizer, or with `change` applied to the
    weights' state dict before saving."""
    import shutil

    from transformers import AutoModelForCausalLM

    shutil.copytree(model_dir, target)
    if change is not None:
        model = AutoModelForCausalLM.from_pretrained(target)
        with torch.no_grad():
            change(model.state_dict())
        model.save_pretrained(target)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return target


def _with_fewer_merges(tokenizer):
    """The same vocabulary and special tokens, a third of the merges: other ids for most text."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][: len(spec["model"]["merges"]) // 3]
    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token)
    other.chat_template = tokenizer.chat_template
    return other


def test_a_tokenizer_with_the_same_vocabulary_and_other_merges_is_refused(
        cache, tiny_model_dir, tmp_path):
    """The tokenizer fingerprint hashed the vocabulary only: a tokenizer that splits text into
    other ids passed (and a cache could resume or merge across the two)."""
    from minorsft.eval import EvalConfig, run_eval
    from minorsft.models import tokenization_fingerprint, tokenizer_fingerprint

    tokenizer = build_tiny_tokenizer()
    other = _with_fewer_merges(tokenizer)
    text = "What is the capital of France? The capital of France is Paris."
    assert len(other(text)["input_ids"]) > len(tokenizer(text)["input_ids"])
    assert tokenizer_fingerprint(other) == tokenizer_fingerprint(tokenizer)
    assert tokenization_fingerprint(other) != tokenization_fingerprint(tokenizer)
    model = _copy_with(tiny_model_dir, tmp_path / "other-merges", tokenizer=other)
    with pytest.raises(CacheError, match=r"fingerprint.tokenization: cache has .*\n    -> the "
                                         "tokenizer splits text into other ids"):
        run_train(config(cache, tmp_path / "run", model=str(model)))
    with pytest.raises(CacheError, match="different tokenization"):
        run_eval(EvalConfig(model=str(model), reference=str(cache)))
    with pytest.raises(CacheError, match="fingerprint"):  # resuming it with the other tokenizer
        run_precompute(PrecomputeConfig(model=str(model), data=str(cache.parent / "sft.jsonl"),
                                        out=str(cache), part_rows=8, max_batch_tokens=256))


def test_one_tensor_changed_between_the_sampled_blocks_is_refused(cache, tiny_model_dir,
                                                                  tmp_path):
    """`weights` reads 17 blocks of 64 KiB: one layer changed between them (partial fine-tuning,
    surgery) passed, and its log-probs went into a cache scored with the other weights."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    from minorsft.models import _BLOCK, _SAMPLE_BLOCKS, tensors_fingerprint, weights_fingerprint

    torch.manual_seed(0)
    big = tmp_path / "big"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                                 num_hidden_layers=4, num_attention_heads=4)).save_pretrained(big)
    file = big / "model.safetensors"
    size = file.stat().st_size
    blocks = [(start := min(size, i * (size - _BLOCK) // _SAMPLE_BLOCKS), start + _BLOCK)
              for i in range(_SAMPLE_BLOCKS + 1)]
    header = json.loads(file.read_bytes()[8:8 + int.from_bytes(file.read_bytes()[:8], "little")])
    base = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    unseen = next(name for name, spec in sorted(header.items()) if name != "__metadata__"
                  and not any(base + spec["data_offsets"][0] < stop
                              and base + spec["data_offsets"][1] > start
                              for start, stop in blocks))
    with safe_open(file, "pt") as handle:
        assert handle.get_tensor(unseen).numel() > 0
    changed = _copy_with(big, tmp_path / "changed",
                         change=lambda state: state[unseen].add_(0.01))
    assert weights_fingerprint(str(changed)) == weights_fingerprint(str(big))
    assert tensors_fingerprint(str(changed)) != tensors_fingerprint(str(big))
    # and train refuses such a model by the new field (on the tiny model both fields differ)
    model = _copy_with(tiny_model_dir, tmp_path / "one-layer",
                       change=lambda state: state["model.layers.1.mlp.down_proj.weight"].add_(0.01))
    with pytest.raises(CacheError, match=r"fingerprint.tensors: cache has .*\n    -> a tensor"):
        run_train(config(cache, tmp_path / "run", model=str(model)))


def test_a_cache_from_before_the_new_fingerprint_fields_still_trains(cache, tmp_path):
    from minorsft.cache import read_metadata, update_metadata

    fields = read_metadata(cache)["fingerprint"]
    update_metadata(cache, {"fingerprint": {key: fields[key] for key in
                                            ("weights", "tokenizer", "chat_template")}})
    assert set(read_metadata(cache)["fingerprint"]) == {"weights", "tokenizer", "chat_template"}
    assert len(run_train(config(cache, tmp_path / "run", max_steps=1))) == 1


def test_a_batch_larger_than_the_cache_gets_a_note(cache, tmp_path):
    """The start-up line said "global batch 32" of a 16-row cache; each step took the 16."""
    import io

    out = io.StringIO()
    run_train(config(cache, tmp_path / "run", batch_size=32, micro_batch_size=4, max_steps=1),
              Console(file=out, width=300))
    assert ("note: --batch-size 32 is more than the cache's 16 rows: a step's batch never spans "
            "two epochs, so each step takes all 16") in out.getvalue()
    assert metrics(tmp_path / "run")[0]["samples"] == 16


def test_saved_weights_get_the_permissions_the_umask_gives(cache, tmp_path):
    """safetensors (0.8.1 on) writes through a private temporary file: model.safetensors was
    0600 beside a 0644 config.json, so another user (a vLLM server's) could not load the model."""
    output = tmp_path / "run"
    run_train(config(cache, output, max_steps=2, save_every=1))
    mode = stat.S_IMODE((output / "config.json").stat().st_mode)  # (what the umask gives)
    assert mode & 0o044  # (a usual umask: others may read; the test means nothing otherwise)
    for weights in (output / "model.safetensors",
                    output / "checkpoints" / "step-2" / "model.safetensors"):
        assert stat.S_IMODE(weights.stat().st_mode) == mode, weights


def test_a_lora_run_resumes_with_its_base_moved(tiny_model_dir, tmp_path, monkeypatch):
    """A checkpoint names its model's folder: a run whose base moved (the same weights and
    config.json elsewhere) could not be resumed, and a LoRA run's adapters are nothing without
    it. Checkpoints record the model's fingerprint, which the moved folder matches."""
    pytest.importorskip("peft")
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    rows = [{"id": f"r{n}", "prompt": f"{n} plus 1", "response": f"{n + 1}."} for n in range(8)]
    (tmp_path / "c").mkdir()
    cache = precompute_rows(str(base), tmp_path / "c", rows)
    lora = dict(lora_r=4, max_steps=4, lr=1e-2)
    run_train(config(cache, tmp_path / "whole", **lora))
    output = tmp_path / "run"
    interrupt_after(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        run_train(config(cache, output, **lora))
    monkeypatch.undo()
    moved = tmp_path / "moved"
    base.rename(moved)
    run_train(config(cache, output, resume=True, model=str(moved), **lora))
    assert metrics(output) == metrics(tmp_path / "whole")
