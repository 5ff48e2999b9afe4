"""Run every bad-input case through the real `minorsft precompute` CLI and print a Markdown table.

    python scripts/bad_inputs_table.py [--model smollm2-135m-instruct] > table.md

For each case, a two-row file (a good row, then the case) is run with the default --on-bad
error: the table shows the exit code and the message. Then one file with all cases between good
rows is run with --on-bad skip, and the table shows what its rejects file says for each row.
The cases are those of tests/bad_input_cases.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minorsft.cli import app  # noqa: E402
from tests.bad_input_cases import CASES, MAX_LENGTH, all_cases_lines, case_file_lines  # noqa: E402


def precompute(runner, model, data, out, *extra):
    args = ["precompute", "--model", model, "--data", str(data), "--out", str(out),
            "--max-length", str(MAX_LENGTH), *extra]
    result = runner.invoke(app, args)
    return result.exit_code, " ".join(result.output.split())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    model = parser.parse_args().model
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        rows = []
        for index, (name, line, _, _) in enumerate(CASES):
            data = folder / f"case{index}.jsonl"
            data.write_bytes(b"\n".join(case_file_lines(line)) + b"\n")
            code, output = precompute(runner, model, data, folder / f"out{index}")
            message = output[output.find("error:"):].replace(str(folder) + "/", "")
            rows.append((name, line, code, message))
        data = folder / "all.jsonl"
        data.write_bytes(b"\n".join(all_cases_lines()) + b"\n")
        skip_code, output = precompute(runner, model, data, folder / "all", "--on-bad", "skip")
        summary = output[output.find("wrote"):].replace(str(folder) + "/", "")
        rejects = [json.loads(x) for x in (folder / "all" / "_rejects.jsonl").read_text()
                   .splitlines()]
    print(f"Model: `{model}`, `--max-length {MAX_LENGTH}`.\n")
    print("| bad input | the row | `--on-bad error` (default): exit code, message | "
          "`--on-bad skip`: rejects file (field: reason) |")
    print("|---|---|---|---|")
    for (name, line, code, message), reject in zip(rows, rejects, strict=True):
        shown = line.decode("utf-8", "backslashreplace")
        shown = shown if len(shown) <= 70 else shown[:67] + "..."
        cell = f"`{reject['field']}`: {reject['reason']}" if reject["field"] else reject["reason"]
        # '|' ends a Markdown table cell, and messages quote tokens such as <|im_end|>
        cells = [f"`{shown}`", f"{code}: {message}", f"line {reject['line']}, {cell}"]
        print(f"| {name} | " + " | ".join(c.replace("|", "&#124;") for c in cells) + " |")
    print(f"\n`--on-bad skip` on all {len(all_cases_lines())} rows at once "
          f"(exit code {skip_code}): {summary}")


if __name__ == "__main__":
    main()
