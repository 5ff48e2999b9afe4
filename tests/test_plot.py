"""`minorsft plot` and the replication script, on the tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from minorsft.cli import app
from minorsft.plot import plot_runs, read_run, run_names
from minorsft.precompute import PrecomputeConfig, run_precompute
from minorsft.train import TrainConfig, run_train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def two_runs(tiny_model_dir, demo_jsonl, tmp_path):
    cache = tmp_path / "ref.parquet"
    run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(demo_jsonl),
                                    out=str(cache)))
    runs = []
    for loss, lr in (("sft", 1e-3), ("minorsft", 3e-3)):
        run_dir = tmp_path / f"{loss}-{lr}"
        run_train(TrainConfig(cache=str(cache), output=str(run_dir), loss=loss, lr=lr,
                              batch_size=4, micro_batch_size=4, max_steps=3))
        runs.append(run_dir)
    return runs


def test_read_run_labels_by_loss_and_lr(two_runs):
    label, rows, config = read_run(two_runs[1])
    assert label == "minorsft-0.003: minorsft lr=0.003 beta=0.04"
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert config["loss"] == "minorsft"


def _fake_run(run_dir: Path, loss: str = "minorsft", lr: float = 1e-3, **config) -> Path:
    """A run folder as `minorsft train` leaves it, without training: two logged steps."""
    run_dir.mkdir(parents=True)
    rows = [{"step": step, "m_theta": 0.01 * step, "nll": 1.0, "loss": 0.7, "coefficient": 0.5,
             "reward": 0.0, "lr": lr} for step in range(2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / "run_config.json").write_text(
        json.dumps({"config": {"loss": loss, "lr": lr, **config}}))
    return run_dir


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures plot_runs saves, as they are when saved."""
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig

    def record(figure, *args, **kwargs):
        figures.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def test_labels_show_beta_for_every_loss_and_the_lora_rank(tmp_path):
    """beta scales the coefficient and reward panels of sft runs too; LoRA runs say so."""
    sft = _fake_run(tmp_path / "sft", loss="sft", beta=0.1)
    assert read_run(sft)[0] == "sft: sft lr=0.001 beta=0.1"
    lora = _fake_run(tmp_path / "lora", loss="sft-dpo", lr=2e-4, lora_r=8)
    assert read_run(lora)[0] == "lora: sft-dpo lr=0.0002 beta=0.04 LoRA r=8"
    full = _fake_run(tmp_path / "full", lora_r=0)
    assert read_run(full)[0] == "full: minorsft lr=0.001 beta=0.04"


def test_read_run_skips_unparsable_lines_with_a_warning(tmp_path, capsys):
    """A run killed mid-write leaves a truncated last line: the steps before it still plot."""
    run_dir = _fake_run(tmp_path / "killed")
    metrics = run_dir / "metrics.jsonl"
    good = metrics.read_text().splitlines()
    metrics.write_text("\n".join([good[0], "garbage", good[1], '{"step": 2, "m_th']))
    _, rows, _ = read_run(run_dir)
    assert [row["step"] for row in rows] == [0, 1]
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2
    assert f"{metrics}:2:" in warnings[0] and f"{metrics}:4:" in warnings[1]
    # where in the line (json's "Invalid control character at" read as cut short)
    assert warnings[1].endswith("(malformed JSON (Unterminated string starting at column 13))")
    # bytes that are not UTF-8 (a damaged disk): their line is skipped, not the file refused
    # with a decoding error that named no file
    metrics.write_bytes("\n".join([good[0], good[1]]).encode() + b"\n\xff\xfe{\n")
    _, rows, _ = read_run(run_dir)
    assert [row["step"] for row in rows] == [0, 1]
    assert f"{metrics}:3: skipped" in capsys.readouterr().err


def test_read_run_refuses_a_run_without_a_parsable_line(tmp_path, capsys):
    run_dir = _fake_run(tmp_path / "broken")
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "lo\n[1, 2]\n')
    with pytest.raises(ValueError, match="no steps logged"):
        read_run(run_dir)
    result = CliRunner().invoke(app, ["plot", str(run_dir), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "no steps logged" in result.output
    assert not (tmp_path / "x.png").exists()


def test_step_axis_has_integer_ticks_only(tmp_path, saved_figures):
    """Two steps (0 and 1) got ticks at 0.2, 0.4, ...: a step is a whole number."""
    plot_runs([_fake_run(tmp_path / "short")], tmp_path / "curves.png")
    (figure,) = saved_figures
    for axis in figure.axes:
        lo, hi = axis.get_xlim()
        ticks = [t for t in axis.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_an_unfinished_run_is_grey_and_says_so(tmp_path, saved_figures):
    """Without run_config.json (written at the end) it took matplotlib's first colour, blue,
    which is raw SFT's."""
    running = _fake_run(tmp_path / "running")
    (running / "run_config.json").unlink()
    plot_runs([_fake_run(tmp_path / "done", loss="sft"), running], tmp_path / "curves.png")
    (figure,) = saved_figures
    lines = {line.get_label(): line.get_color() for line in figure.axes[0].get_lines()
             if not line.get_label().startswith("_")}
    assert lines == {"done: sft lr=0.001 beta=0.04": "tab:blue", "running (unfinished)": "tab:gray"}


@pytest.mark.parametrize("text", ['{"config": {"loss": "s', "[1]", '{"config": 3}'])
def test_a_damaged_run_config_is_named_and_does_not_stop_the_plot(tmp_path, capsys, text):
    """A run_config.json cut short stopped the plot of every run with a bare JSON error naming
    no file; valid JSON of another shape was a traceback."""
    damaged = _fake_run(tmp_path / "damaged")
    (damaged / "run_config.json").write_text(text)
    label, rows, config = read_run(damaged)
    assert label == "damaged (unfinished)" and rows and config == {}
    assert f"warning: {damaged / 'run_config.json'}: unreadable" in capsys.readouterr().err
    result = CliRunner().invoke(app, ["plot", str(_fake_run(tmp_path / "fine")), str(damaged),
                                      "-o", str(tmp_path / "both.png")])
    assert result.exit_code == 0, result.output


def test_cli_plot_reports_the_file_it_wrote(tmp_path):
    """matplotlib adds .png to an -o without extension: the message names that file."""
    run_dir = _fake_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["plot", str(run_dir), "-o", str(tmp_path / "p5")])
    assert result.exit_code == 0, result.output
    written = tmp_path / "p5.png"
    assert written.read_bytes().startswith(PNG_MAGIC)
    assert not (tmp_path / "p5").exists()
    assert f"wrote {written}" in "".join(result.output.split("\n"))


def test_run_names_add_parent_folders_only_to_tell_runs_apart(tmp_path):
    assert run_names([tmp_path / "a" / "minor", tmp_path / "b" / "sft"]) == ["minor", "sft"]
    assert run_names([tmp_path / "a" / "minor", tmp_path / "b" / "minor"]) == ["a/minor",
                                                                               "b/minor"]


def test_legend_tells_runs_of_the_same_settings_apart(tmp_path, saved_figures):
    """Two runs with equal loss, lr and beta (say, other data) had the same legend label."""
    runs = [_fake_run(tmp_path / "seed1" / "minor"), _fake_run(tmp_path / "seed2" / "minor")]
    plot_runs(runs, tmp_path / "curves.png")
    legends = [[text.get_text() for text in figure.legends[0].get_texts()]
               for figure in saved_figures]
    assert legends == [["seed1/minor: minorsft lr=0.001 beta=0.04",
                        "seed2/minor: minorsft lr=0.001 beta=0.04"]]


def test_labels_and_title_are_drawn_as_written(tmp_path, saved_figures):
    """matplotlib leaves a label starting with `_` out of the legend and reads `$...$` as a
    formula (an unbalanced one failed the plot); many runs of one loss repeated their style."""
    runs = [_fake_run(tmp_path / "_scratch"), _fake_run(tmp_path / "$x$", lr=2e-3),
            *(_fake_run(tmp_path / f"r{n}", lr=n * 1e-3) for n in range(3, 7))]
    plot_runs(runs, tmp_path / "curves.png", title=r"costs $5 and $\frac{x$")
    figure = saved_figures[0]
    figure.canvas.draw()  # (a formula that does not parse fails here)
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert len(labels) == 6 and labels[0].endswith("_scratch: minorsft lr=0.001 beta=0.04")
    assert labels[1] == r"\$x\$: minorsft lr=0.002 beta=0.04"
    assert figure._suptitle.get_text() == r"costs \$5 and \$\frac{x\$"
    lines = figure.axes[1].get_lines()  # (the first panel has a line at m_theta = 0 too)
    styles = [(line.get_linestyle(), line.get_marker()) for line in lines]
    assert len(set(styles)) == len(styles) == 6


def test_cli_plot_writes_png(two_runs, tmp_path):
    out = tmp_path / "fig" / "curves.png"
    result = CliRunner().invoke(app, ["plot", *map(str, two_runs), "-o", str(out),
                                      "--title", "tiny"])
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_cli_plot_rejects_a_folder_without_metrics(tmp_path):
    result = CliRunner().invoke(app, ["plot", str(tmp_path), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "no metrics.jsonl" in " ".join(result.output.split())
    assert not (tmp_path / "x.png").exists()


def test_cli_plot_leaves_out_a_run_that_has_just_started(tmp_path, saved_figures):
    """A run with nothing logged yet (its metrics.jsonl empty) stopped the whole plot."""
    done = _fake_run(tmp_path / "done")
    started = tmp_path / "started"
    started.mkdir()
    (started / "metrics.jsonl").write_text("")
    result = CliRunner().invoke(app, ["plot", str(done), str(started), "-o",
                                      str(tmp_path / "x.png")])
    assert result.exit_code == 0, result.output
    assert "started/metrics.jsonl: no steps logged; its run is left out" in result.output
    legends = [[text.get_text() for text in figure.legends[0].get_texts()]
               for figure in saved_figures]
    assert legends == [["done: minorsft lr=0.001 beta=0.04"]]
    # only such runs: nothing to draw
    result = CliRunner().invoke(app, ["plot", str(started), "-o", str(tmp_path / "y.png")])
    assert result.exit_code == 2 and "no steps logged" in result.output


def test_cli_plot_output_mistakes_are_one_line(tmp_path):
    run_dir = _fake_run(tmp_path / "run")
    (tmp_path / "a.csv").write_text("x")
    (tmp_path / "folder").mkdir()
    for out, message in ((tmp_path / "a.csv" / "x.png", "cannot create its folder"),
                         (tmp_path / "folder", "is a folder; give a file name"),
                         (tmp_path / "curves.txt", "-o {}: .txt is no picture format "
                                                   "matplotlib writes; use one of")):
        result = CliRunner().invoke(app, ["plot", str(run_dir), "-o", str(out)])
        assert result.exit_code == 2 and message.format(out) in " ".join(result.output.split())
    assert not (tmp_path / "folder.png").exists() and not (tmp_path / "curves.txt").exists()
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "nope"), "-o", str(tmp_path / "z")])
    assert result.exit_code == 2 and "nope: no such folder" in " ".join(result.output.split())


def test_replicate_script_end_to_end_tiny(tiny_model_dir, tmp_path):
    """The sweep script on the tiny model and made-up GSM8K/MMLU-shaped files."""
    spec = importlib.util.spec_from_file_location(
        "replicate", Path(__file__).parents[1] / "experiments" / "replicate.py")
    replicate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replicate)
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {i} plus 3?",
                                       "answer": f"{i} + 3 = {i + 3}\n#### {i + 3}"}) + "\n"
                           for i in range(8)))
    mmlu = tmp_path / "mmlu.csv"
    mmlu.write_text("What is 2 + 2?,3,4,5,22,B\nHow many legs does a spider have?,2,4,6,8,D\n")
    out = tmp_path / "rep"
    args = ["--gsm8k-train", str(gsm), "--gsm8k-test", str(gsm), "--mmlu", str(mmlu),
            "--out", str(out), "--model", str(tiny_model_dir), "--train-rows", "8",
            "--heldout-rows", "4", "--lrs", "1e-3", "--batch-size", "4"]
    replicate.main(args)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["base", "sft-lr0.001", "sft-dpo-lr0.001",
                                        "minorsft-lr0.001"]
    assert rows[0]["heldout_m_theta"] == 0.0
    assert all(r["train_steps"] == 2 and r["heldout_m_theta"] != 0.0 for r in rows[1:])
    assert all(r["mmlu_questions"] == 2 for r in rows)
    assert "| minorsft-lr0.001 | minorsft | 0.001 |" in (out / "results.md").read_text()
    for name in ("curves.png", "summary.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    assert not list((out / "runs").glob("*/*.safetensors"))  # checkpoints removed by default
    # MinorSFT against the other losses, answer by answer, from the runs' --per-item lines
    paired = json.loads((out / "results.json").read_text())["paired"]
    assert [row["pair"] for row in paired] == ["minorsft vs sft, lr 0.001",
                                               "minorsft vs sft-dpo, lr 0.001"]
    items = [json.loads(line) for line in
             (out / "runs" / "minorsft-lr0.001" / "items.jsonl").read_text().splitlines()]
    assert len(items) == 4 + 2
    for row in paired:
        assert row["heldout"] == 4 and row["questions"] == 2
        assert row["r_lower"] + row["r_higher"] <= 4 and 0 < row["r_sign_test_p"] <= 1
    assert "| minorsft vs sft, lr 0.001 |" in (out / "results.md").read_text()
    assert replicate.sign_test(14, 2) == pytest.approx(0.00418, abs=1e-5)  # 2 x 137 / 2**16
    assert replicate.sign_test(3, 3) == 1.0 and replicate.sign_test(0, 0) == 1.0


def test_held_out_panels_appear_where_a_run_has_them(tmp_path, saved_figures):
    """A run trained with --eval-cache has eval_metrics.jsonl: its held-out m_theta and NLL
    get two panels (a run without them draws nothing there); without any, six panels."""
    plain = _fake_run(tmp_path / "plain", loss="sft")
    evaluated = _fake_run(tmp_path / "evaluated")
    records = [{"step": 0, "m_theta": 0.0, "nll_per_token": 2.0},
               {"step": 2, "m_theta": 0.03, "nll_per_token": None}]  # (null: not finite)
    (evaluated / "eval_metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "m_th')
    plot_runs([plain, evaluated], tmp_path / "curves.png")
    plot_runs([plain], tmp_path / "plain.png")
    with_heldout, without = saved_figures
    titles = [axis.get_title() for axis in with_heldout.axes]
    assert len(titles) == 8 and len(without.axes) == 6
    m_theta = with_heldout.axes[titles.index("held-out m_theta (eq. 8)")]
    (line,) = [line for line in m_theta.get_lines() if not line.get_label().startswith("_")]
    assert line.get_label().startswith("evaluated") and list(line.get_xdata()) == [0, 2]
    assert list(line.get_ydata()) == [0.0, 0.03]
