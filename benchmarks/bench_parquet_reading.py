"""Peak resident memory of reading a Parquet data set: minorsft's streamed reader vs a whole-file
read.

Writes a synthetic chat data set (`--rows` rows of random words, `--answer-chars` characters of
answer each) as one Parquet file, then reads every row in a fresh child per method and reports
how far the resident high-water mark rose above the child's resident memory before reading:

- whole: `polars.read_parquet(path).iter_rows(named=True)`, the file loaded at once, and each
  row's JSON text made for the rejects report (minorsft read Parquet so until 0.5.0);
- polars-streamed: `polars.scan_parquet(path).collect_batches(chunk_size=4096)`;
- streamed: `minorsft.row_reading.read_rows`, which decodes `PARQUET_BATCH_ROWS` rows at a time
  through pyarrow.

Both give the same rows (tests/test_data.py checks it). Usage:

    python benchmarks/bench_parquet_reading.py --rows 100000 --answer-chars 4000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import string
import tempfile
import time
from pathlib import Path


def _status_mib(key: str) -> float:
    """VmRSS (resident now) or VmHWM (its high-water mark) of this process. (Not getrusage's
    ru_maxrss: it survives exec, so a spawned child would report its parent's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def _read(method: str, path: str, queue) -> None:
    import polars as pl

    from minorsft.row_reading import read_rows

    before = _status_mib("VmRSS")
    started = time.perf_counter()
    count = 0
    if method == "whole":  # as minorsft read Parquet until 0.5.0, the row's raw text too
        for record in pl.read_parquet(path).iter_rows(named=True):
            json.dumps(record, default=str)
            count += 1
    elif method == "polars-streamed":  # polars' own streaming reader, the same batch size
        for batch in pl.scan_parquet(path).collect_batches(chunk_size=4096):
            for record in batch.iter_rows(named=True):
                json.dumps(record, default=str)
                count += 1
    else:
        for _ in read_rows(Path(path)):
            count += 1
    queue.put((count, _status_mib("VmHWM") - before, time.perf_counter() - started))


def _write_data(path: Path, rows: int, answer_chars: int, row_group_rows: int | None) -> None:
    import polars as pl

    # random words, so that the file is about as large as the text (real text compresses
    # about 3:1; a repeated answer would compress to nothing)
    generator = random.Random(0)
    words = ["".join(generator.choices(string.ascii_lowercase, k=generator.randint(2, 9)))
             for _ in range(5000)]

    def text(chars: int) -> str:
        return " ".join(generator.choices(words, k=chars // 6))[:chars]

    frame = pl.DataFrame({
        "id": [f"row-{index}" for index in range(rows)],
        "messages": [[{"role": "user", "content": text(200)},
                      {"role": "assistant", "content": text(answer_chars)}]
                     for _ in range(rows)],
    })
    frame.write_parquet(path, row_group_size=row_group_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--answer-chars", type=int, default=4000)
    parser.add_argument("--row-group-rows", type=int, default=None,
                        help="Rows per Parquet row group (default: polars' writer default).")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.parquet"
        _write_data(path, args.rows, args.answer_chars, args.row_group_rows)
        import pyarrow.parquet as pq

        size = path.stat().st_size / 2**20
        groups = pq.ParquetFile(path).metadata.num_row_groups
        print(f"{args.rows} rows, {args.answer_chars} answer characters each: "
              f"{size:.1f} MiB of Parquet in {groups} row group(s)")
        print("| method | rows read | peak resident rise (MiB) | seconds |")
        print("|---|---|---|---|")
        for method in ("whole", "polars-streamed", "streamed"):
            queue = context.Queue()
            child = context.Process(target=_read, args=(method, str(path), queue))
            child.start()
            count, rise, seconds = queue.get()
            child.join()
            print(f"| {method} | {count} | {rise:.0f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
