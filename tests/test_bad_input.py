"""Every kind of bad input row: a clear error by default, and with --on-bad skip a rejects file
where input rows = cached rows + rejected rows."""

from __future__ import annotations

import base64
import json

import pytest
from typer.testing import CliRunner

from minorsft.cache import iter_rows, read_metadata
from minorsft.cli import app
from minorsft.data import REJECT_RAW_LIMIT, DataError, Rejection
from minorsft.precompute import PrecomputeConfig, run_precompute

from .bad_input_cases import CASES, MAX_LENGTH, all_cases_lines, case_file_lines

# One torch thread: these tests run many tiny forward passes, where a second thread only adds
# contention (measured ~40x slower matmuls on a loaded 2-core machine).
pytestmark = pytest.mark.usefixtures("one_thread")


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize(("name", "line", "field", "reason"), CASES, ids=[c[0] for c in CASES])
def test_each_bad_row_stops_precompute_naming_file_line_and_field(
        tiny_model_dir, tmp_path, name, line, field, reason):
    data = write_lines(tmp_path / "rows.jsonl", case_file_lines(line))
    out = tmp_path / "ref.parquet"
    with pytest.raises(DataError) as caught:
        run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(data), out=str(out),
                                        max_length=MAX_LENGTH))
    error = caught.value
    assert (error.line, error.field) == (2, field)
    assert reason in str(error) and str(error).startswith(f"{data}:2:")
    if field:
        assert f"field {field!r}" in str(error)


def test_skip_accounts_for_every_row_across_parts(tiny_model_dir, tmp_path):
    lines = all_cases_lines()
    data = write_lines(tmp_path / "rows.jsonl", lines[:5] + [b"", b"   "] + lines[5:])
    out = tmp_path / "ref.parquet"
    summary = run_precompute(PrecomputeConfig(
        model=str(tiny_model_dir), data=str(data), out=str(out), max_length=MAX_LENGTH,
        on_bad="skip", part_rows=5))
    rows_in = len(lines)  # blank lines are not rows
    assert summary.rows_in == rows_in == summary.rows_cached + summary.rows_rejected
    assert summary.rows_rejected == len(CASES)
    metadata = read_metadata(out)
    assert (metadata["rows_in"], metadata["rows"], metadata["rows_rejected"]) == (
        rows_in, rows_in - len(CASES), len(CASES))
    rejects = [json.loads(x) for x in (out / "_rejects.jsonl").read_text().splitlines()]
    assert [r["field"] for r in rejects] == [field for _, _, field, _ in CASES]
    for (_, line, _, reason), reject in zip(CASES, rejects, strict=True):
        assert reason in reject["reason"] and reject["file"] == str(data)
        # a line that is not UTF-8 keeps its bytes as they were (`raw` has U+FFFD in place of
        # the bad ones); the others' `raw` is the line itself
        not_utf8 = "not valid UTF-8" in reason
        assert ("raw_base64" in reject) == not_utf8
        assert reject["raw"] == line.decode("utf-8", "replace")
        assert (base64.b64decode(reject["raw_base64"]) if not_utf8
                else reject["raw"].encode()) == line
    cached_lines = {r["line"] for r in iter_rows(out)}
    rejected_lines = {r["line"] for r in rejects}
    assert not cached_lines & rejected_lines
    assert len(cached_lines | rejected_lines) == rows_in
    assert [r["id"] for r in iter_rows(out)][:2] == ["good", "good-0"]


def test_cli_reports_bad_row_with_exit_code_2(tiny_model_dir, tmp_path):
    robot = next(line for name, line, _, _ in CASES if name == "unknown role")
    data = write_lines(tmp_path / "rows.jsonl", case_file_lines(robot))
    out = tmp_path / "ref.parquet"
    runner = CliRunner()
    result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                 str(data), "--out", str(out)])
    assert result.exit_code == 2
    assert "rows.jsonl:2: field 'messages[0].role': unknown role 'robot'" in " ".join(
        result.output.split())
    result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                 str(data), "--out", str(out), "--on-bad", "skip"])
    assert result.exit_code == 0, result.output
    assert "2 input rows = 1 cached + 1 rejected" in " ".join(result.output.split())
    # rows cut at --max-length are counted in the summary (it did not say any were)
    result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir), "--data",
                                 str(data), "--out", str(out), "--on-bad", "skip",
                                 "--max-length", "24", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert ("2 input rows = 1 cached (1 cut at --max-length 24) + 1 rejected"
            in " ".join(result.output.split()))


def test_rejects_keep_a_long_row_whole(tiny_model_dir, tmp_path):
    """A rejected chat row of 10,000 characters goes to the report as it was (it used to be cut
    at 2,000), so that it can be fixed and fed again; only a line beyond REJECT_RAW_LIMIT is
    cut, and then marked."""
    long_row = {"messages": [{"role": "user", "content": "x" * 10_000},
                             {"role": "robot", "content": "y"}]}
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" + json.dumps(long_row)
                    + "\n")
    out = tmp_path / "ref.parquet"
    run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(data), out=str(out),
                                    on_bad="skip", verify_sample=0))
    (reject,) = [json.loads(x) for x in (out / "_rejects.jsonl").read_text().splitlines()]
    assert json.loads(reject["raw"]) == long_row and "raw_truncated" not in reject
    huge = Rejection(str(data), 3, None, "too long", raw="z" * (REJECT_RAW_LIMIT + 5))
    record = huge.as_dict()
    assert len(record["raw"]) == REJECT_RAW_LIMIT and record["raw_truncated"] is True


def test_an_empty_file_is_refused_before_the_model_loads(tiny_model_dir, tmp_path):
    """An empty (or blank) file printed a 0/0 progress line before saying it was empty."""
    runner = CliRunner()
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    import polars as pl

    pl.DataFrame({"prompt": [], "response": []}, schema={"prompt": pl.String,
                                                         "response": pl.String}).write_parquet(
        tmp_path / "none.parquet")
    for data, what in ((["empty.jsonl"], "empty.jsonl: no rows (the file is empty)"),
                       (["none.parquet"], "none.parquet: no rows (the file is a table of no "
                                          "rows)"),
                       (["blank.jsonl"], "blank.jsonl: no rows (the file holds only blank "
                                         "lines)"),
                       (["empty.jsonl", "blank.jsonl"], "no rows (the files hold only blank "
                                                        "lines)")):
        result = runner.invoke(app, ["precompute", "--model", str(tiny_model_dir),
                                     *[arg for name in data
                                       for arg in ("--data", str(tmp_path / name))],
                                     "--out", str(tmp_path / "c"), "--on-bad", "skip"])
        assert result.exit_code == 2, result.output
        assert what in " ".join(result.output.split())
        assert "scoring" not in result.output and "Loading weights" not in result.output
