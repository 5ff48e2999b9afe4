"""Both cache layouts read alike; `cache info` and `cache merge` on the command line."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from minorsft.cache import (
    CacheError,
    CacheWriter,
    iter_rows,
    merge_caches,
    read_metadata,
    update_metadata,
)
from minorsft.cli import app
from minorsft.precompute import PrecomputeConfig, run_precompute

# One torch thread: these tests run many tiny forward passes, where a second thread only adds
# contention (measured ~40x slower matmuls on a loaded 2-core machine).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def parts_cache(tiny_model_dir, demo_jsonl, tmp_path):
    out = tmp_path / "ref.parquet"
    run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(demo_jsonl),
                                    out=str(out), part_rows=6, max_batch_tokens=256,
                                    verify_sample=0))  # drift is added by hand below
    return out


def test_single_file_cache_reads_like_the_parts_directory(parts_cache, tmp_path):
    rows = list(iter_rows(parts_cache))
    metadata = read_metadata(parts_cache)
    single = tmp_path / "single.parquet"
    writer = CacheWriter(single, {k: v for k, v in metadata.items() if k != "rows"})
    writer.write({key: [r[key] for r in rows] for key in rows[0]})
    writer.close()
    assert list(iter_rows(single)) == rows
    assert read_metadata(single)["rows"] == 16 and read_metadata(single)["layout"] == "file"
    assert metadata["layout"] == "parts" and metadata["parts"] == 3


def test_a_cache_from_before_the_file_column_still_reads_and_trains(parts_cache, tmp_path):
    """Caches written before 0.7 have no `file` column: their rows read with file None, their
    values are checked, and train runs on them."""
    import pyarrow.parquet as pq

    from minorsft.cache import input_place, validate_values

    old = tmp_path / "old.parquet"
    shutil.copytree(parts_cache, old)
    for part in sorted(old.glob("part-*.parquet")):
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["file"]), part)  # (the schema metadata is kept)
    rows = list(iter_rows(old))
    assert [row["file"] for row in rows] == [None] * 16
    assert [{**row, "file": None} for row in iter_rows(parts_cache)] == rows
    validate_values(old)
    assert input_place(rows[0]) == "input line 1"
    assert input_place(next(iter_rows(parts_cache))).startswith("input /")
    result = CliRunner().invoke(app, ["train", "--cache", str(old), "--model",
                                      str(read_metadata(old)["model"]), "--output",
                                      str(tmp_path / "run"), "--max-steps", "1"])
    assert result.exit_code == 0, result.output


def test_one_part_file_is_refused_as_a_cache_with_its_folder_named(parts_cache):
    """It was read as a whole single-file cache: train would have used 6 of 16 rows."""
    part = parts_cache / "part-00001.parquet"
    with pytest.raises(CacheError, match=f"part 1 of the cache in {parts_cache}, not a whole"):
        read_metadata(part)
    result = CliRunner().invoke(app, ["train", "--cache", str(part), "--output", "unused"])
    assert result.exit_code == 2 and "give the folder" in " ".join(result.output.split())


def test_drift_added_after_scoring_shows_in_cache_info(parts_cache, tmp_path):
    runner = CliRunner()
    first = runner.invoke(app, ["cache", "info", str(parts_cache)]).output
    assert "not measured" in first and "status: complete" in first
    drift = {"per_token_mean_abs": 0.0123, "rows": 16}
    update_metadata(parts_cache, {"drift": drift})
    result = runner.invoke(app, ["cache", "info", str(parts_cache)])
    assert result.exit_code == 0, result.output
    assert "drift per_token_mean_abs: 0.0123" in result.output
    assert "16 cached + 0 rejected = 16 input rows" in result.output
    assert "answer tokens m: mean" in result.output and "ref_logps: double" in result.output
    info = json.loads(runner.invoke(app, ["cache", "info", str(parts_cache), "--json"]).output)
    assert info["metadata"]["drift"] == drift and info["rows"] == 16 and info["files"] == 3
    assert read_metadata(parts_cache)["drift"] == drift


def test_cache_merge_and_info_refusals_on_the_command_line(tiny_model_dir, demo_jsonl,
                                                           parts_cache, tmp_path):
    runner = CliRunner()
    shards = []
    for index in range(2):
        out = tmp_path / f"shard-{index}"
        result = runner.invoke(app, [
            "precompute", "--model", str(tiny_model_dir), "--data", str(demo_jsonl), "--out",
            str(out), "--part-rows", "6", "--max-batch-tokens", "256", "--shard", f"{index}/2"])
        assert result.exit_code == 0, result.output
        assert "not complete yet" in " ".join(result.output.split())
        shards.append(str(out))
    # one shard alone: shown for what it holds, and said to be incomplete
    result = runner.invoke(app, ["cache", "info", shards[0]])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "status: INCOMPLETE" in text and "shard 1/2 has not started" in text
    info = json.loads(runner.invoke(app, ["cache", "info", shards[0], "--json"]).output)
    assert 0 < info["rows"] < 16 and "shard 1/2 has not started" in info["incomplete"][0]
    assert "CORRUPT" not in text and "complete" not in text.replace("INCOMPLETE", "")
    # rows so far that are corrupt are said to be, not only that more are to come
    corrupt = shutil.copytree(shards[0], tmp_path / "corrupt-shard")
    part = next(corrupt.glob("part-*.parquet"))
    table = pq.read_table(part)
    column = table.schema.get_field_index("ref_logps")
    nan = pa.array([float("nan")] * table.num_rows, pa.float64())
    # (a nullable column, as a hand-rewritten part has: info read such parts as a pyarrow error)
    pq.write_table(table.set_column(column, "ref_logps", nan)
                   .replace_schema_metadata(table.schema.metadata), part)
    text = " ".join(runner.invoke(app, ["cache", "info", str(corrupt)]).output.split())
    assert "status: INCOMPLETE" in text and "status: CORRUPT" in text, text
    assert "where ref_logps is not finite" in text
    result = runner.invoke(app, ["train", "--cache", shards[0], "--output",
                                 str(tmp_path / "partial-run")])
    assert result.exit_code == 2 and "shard 1/2 has not started" in result.output
    merged = tmp_path / "merged"
    result = runner.invoke(app, ["cache", "merge", *shards, "--out", str(merged)])
    assert result.exit_code == 0, result.output
    assert "3 parts, 16 rows cached" in " ".join(result.output.split())
    # shards in folders of their own never reach the drift check: merge says how to run it
    assert (f"`minorsft verify --cache {merged} --store` measures it and keeps it in the "
            "cache's metadata") in " ".join(result.output.split())
    assert list(iter_rows(merged)) == list(iter_rows(parts_cache))
    result = runner.invoke(app, ["cache", "merge", *shards, "--out", str(merged)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    # the input data where the cache belongs: the step that makes one is named
    result = runner.invoke(app, ["train", "--cache", str(demo_jsonl), "--output",
                                 str(tmp_path / "run")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "not a readable Parquet file" in text
    assert "`minorsft precompute --data` turns it into a cache" in text
    damaged = tmp_path / "damaged.parquet"  # a cache cut short: no hint about input data
    damaged.write_bytes(b"PAR1" + b"\0" * 64)
    result = runner.invoke(app, ["train", "--cache", str(damaged), "--output",
                                 str(tmp_path / "run")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "not a readable Parquet file" in text
    assert "precompute --data" not in text


def test_overwrite_replaces_only_a_minorsft_cache_never_other_files(parts_cache, demo_jsonl,
                                                                    tiny_model_dir, tmp_path):
    """--overwrite deleted whatever file --out named: the input data itself, when --out was it."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(demo_jsonl.read_bytes())
    other = tmp_path / "notes.jsonl"
    other.write_text("keep me\n")
    for out in (data, other):
        with pytest.raises(CacheError, match="choose another --out"):
            run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(data),
                                            out=str(out), overwrite=True, verify_sample=0))
    assert data.read_bytes() == demo_jsonl.read_bytes() and other.read_text() == "keep me\n"
    # an old single-file cache is still replaced on request (and only on request)
    rows, metadata = list(iter_rows(parts_cache)), read_metadata(parts_cache)
    single = tmp_path / "single.parquet"
    writer = CacheWriter(single, {k: v for k, v in metadata.items() if k != "rows"})
    writer.write({key: [r[key] for r in rows] for key in rows[0]})
    writer.close()
    config = dict(model=str(tiny_model_dir), data=str(data), out=str(single), part_rows=6,
                  max_batch_tokens=256, verify_sample=0)
    with pytest.raises(CacheError, match="pass --overwrite"):
        run_precompute(PrecomputeConfig(**config))
    run_precompute(PrecomputeConfig(**config, overwrite=True))
    # (the same rows, from a copy of the input file)
    assert single.is_dir() and list(iter_rows(single)) == [{**row, "file": str(data)}
                                                           for row in rows]


def test_merge_mistakes_are_named(parts_cache, tiny_model_dir, demo_jsonl, tmp_path):
    other = tmp_path / "other"
    run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(demo_jsonl),
                                    out=str(other), part_rows=6, max_batch_tokens=256,
                                    max_length=64, verify_sample=0))
    out = tmp_path / "merged"
    runner = CliRunner()

    def merge(*args):
        result = runner.invoke(app, ["cache", "merge", *map(str, args)])
        assert result.exit_code == 2, result.output
        return " ".join(result.output.split())

    # the message names each manifest with its own directory (it blamed the first source's),
    # in the order of the values around the arrow (it named them the other way round)
    text = merge(parts_cache, other, "--out", out)
    assert f"{parts_cache / '_manifest.json'} and {other / '_manifest.json'}" in text
    assert "max_length: 2048 -> 64" in text
    # other input: said in words, as precompute's resume check says it (it was a raw dict)
    shorter = tmp_path / "shorter.jsonl"
    shorter.write_text("".join(demo_jsonl.read_text().splitlines(keepends=True)[:-1]))
    run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(shorter),
                                    out=str(other), part_rows=6, max_batch_tokens=256,
                                    verify_sample=0, overwrite=True))
    text = merge(parts_cache, other, "--out", out)
    assert "different input and cannot form one cache: input content: sha256 " in text
    assert f"{demo_jsonl.stat().st_size} bytes -> " in text and "{" not in text
    assert "a source is given twice" in merge(parts_cache, parts_cache, "--out", out)
    assert "no such directory" in merge(tmp_path / "nope", other, "--out", out)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    shards = []
    for index in (0, 1):
        shards.append(tmp_path / f"shard-{index}")
        run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(demo_jsonl),
                                        out=str(shards[-1]), part_rows=6, max_batch_tokens=256,
                                        shard=f"{index}/2", verify_sample=0))
    assert "not a minorsft cache" in merge(*shards, "--out", notes, "--overwrite")
    assert notes.read_text() == "keep me"
    copy = tmp_path / "shard-0-copy"
    shutil.copytree(shards[0], copy)
    assert "is a shard given twice?" in merge(*shards, copy, "--out", tmp_path / "m2")
    # a file where a folder of --out's path should be: one line, not a traceback
    assert "cannot create its folder" in merge(*shards, "--out", notes / "merged")
    # the working folder (empty): --overwrite would move it aside, a traceback ("busy")
    (tmp_path / "empty").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path / "empty")
        for out in (".", ".."):
            assert "is the working folder or holds it" in merge(*shards, "--out", out,
                                                                "--overwrite")
    assert (tmp_path / "empty").is_dir()


def test_merge_takes_shards_of_the_same_files_under_other_names(tiny_model_dir, demo_jsonl,
                                                                tmp_path):
    """The same content under other file names is the same input for precompute's resume
    check; merge refused it (with a message that read "None")."""
    lines = demo_jsonl.read_text().splitlines(keepends=True)
    shards = []
    for index, folder in enumerate(("machine-a", "machine-b")):
        (tmp_path / folder).mkdir()
        names = []
        for half, part in enumerate((lines[:8], lines[8:])):
            names.append(tmp_path / folder / f"{folder}-{half}.jsonl")
            names[-1].write_text("".join(part))
        shards.append(tmp_path / f"shard-{index}")
        run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=[str(n) for n in names],
                                        out=str(shards[-1]), part_rows=6, max_batch_tokens=256,
                                        shard=f"{index}/2", verify_sample=0))
    result = CliRunner().invoke(app, ["cache", "merge", *map(str, shards), "--out",
                                      str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert len(list(iter_rows(tmp_path / "merged"))) == len(lines)


def test_merge_over_a_cache_with_a_damaged_part_leaves_it_as_it_was(parts_cache, tmp_path):
    """--overwrite replaced the good cache first and found the damage after: both were lost."""
    good = tmp_path / "good"
    merge_caches([parts_cache], good)
    rows = list(iter_rows(good))
    damaged = tmp_path / "damaged"
    shutil.copytree(parts_cache, damaged)
    with (damaged / "part-00001.parquet").open("r+b") as part:  # a copy cut short
        part.truncate(100)
    before = sorted(tmp_path.iterdir())
    # named in its source, not in the merge's hidden folder
    with pytest.raises(CacheError, match=f"^{damaged / 'part-00001.parquet'}: part 1 is "
                                         "damaged .*re-run the precompute command that wrote "
                                         "it to recompute it, then merge$"):
        merge_caches([damaged], good, overwrite=True)
    assert list(iter_rows(good)) == rows
    with pytest.raises(CacheError, match="part 1"):
        merge_caches([damaged], tmp_path / "new")
    assert sorted(tmp_path.iterdir()) == before  # no staging or half cache left


def test_cache_files_get_the_umask_permissions_not_private_ones(tiny_model_dir, demo_jsonl,
                                                                 tmp_path):
    """Written through mkstemp, parts and manifests were 0600: unreadable on a shared disk."""
    before = os.umask(0o022)
    try:
        out = tmp_path / "ref.parquet"
        run_precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(demo_jsonl),
                                        out=str(out), part_rows=6, max_batch_tokens=256,
                                        verify_sample=0))
        merged = tmp_path / "merged"
        merge_caches([out], merged)
    finally:
        os.umask(before)
    files = [*out.iterdir(), *merged.iterdir()]
    assert any(f.name.startswith("part-") for f in files)
    for file in files:
        want = 0o755 if file.is_dir() else 0o644
        assert stat.S_IMODE(file.stat().st_mode) == want, file
    assert stat.S_IMODE(merged.stat().st_mode) == 0o755


def test_a_folder_of_other_files_is_never_written_into_or_cleared(demo_jsonl, tiny_model_dir,
                                                                  tmp_path):
    """--overwrite deleted every part-*.parquet in --out (a Spark output's too, the input among
    them), and without it the cache could replace an input file inside --out."""
    folder = tmp_path / "spark"
    folder.mkdir()
    spark_parts = [folder / "part-00000-c000.snappy.parquet", folder / "part-00000.parquet"]
    for file in spark_parts:
        file.write_bytes(b"user data")
    (folder / ".DS_Store").write_bytes(b"")
    config = dict(model=str(tiny_model_dir), verify_sample=0)
    for data in spark_parts:  # the input inside --out: refused, with or without --overwrite
        for overwrite in (False, True):
            with pytest.raises(CacheError, match="lies inside --out"):
                run_precompute(PrecomputeConfig(**config, data=str(data), out=str(folder),
                                                overwrite=overwrite))
    for overwrite in (False, True):  # other files and no cache: refused
        with pytest.raises(CacheError, match=r"a folder of other files \(part-00000-c000"):
            run_precompute(PrecomputeConfig(**config, data=str(demo_jsonl), out=str(folder),
                                            overwrite=overwrite))
    assert all(file.read_bytes() == b"user data" for file in spark_parts)
    # as it was: no lock file left behind in the user's folder either
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [".DS_Store", *(file.name for file in spark_parts)])
    # A cache folder the user also put a file in: --overwrite replaces the cache, keeps the file.
    cache = tmp_path / "cache"
    run_precompute(PrecomputeConfig(**config, data=str(demo_jsonl), out=str(cache), part_rows=6))
    (cache / "README.txt").write_text("keep me")
    run_precompute(PrecomputeConfig(**config, data=str(demo_jsonl), out=str(cache), part_rows=8,
                                    overwrite=True))
    assert (cache / "README.txt").read_text() == "keep me"
    assert read_metadata(cache)["parts"] == 2 and len(list(cache.glob("part-*"))) == 2


def test_lost_rejects_are_recomputed_and_damage_is_named(tiny_model_dir, tmp_path):
    """A deleted _rejects/ folder left a manifest counting rejects nobody could see, and every
    rerun failed with a bare 'No such file'; a damaged part or manifest gave a traceback."""
    rows = [*[dict(prompt=f"q{i}", response=f"a{i}") for i in range(5)], {"prompt": "no answer"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "cache"
    config = PrecomputeConfig(model=str(tiny_model_dir), data=str(data), out=str(out),
                              part_rows=4, on_bad="skip", verify_sample=0)
    run_precompute(config)
    rejects = (out / "_rejects.jsonl").read_text()
    runner = CliRunner()
    for victim in ("_rejects", "_rejects.jsonl"):
        shutil.rmtree(out / victim) if (out / victim).is_dir() else (out / victim).unlink()
        if victim == "_rejects":
            result = runner.invoke(app, ["cache", "info", str(out)])
            assert result.exit_code == 2 and "rejected rows of part 1" in result.output
        summary = run_precompute(config)  # the part that lost its rejects is scored again
        assert summary.rows_rejected == 1 and summary.rows_cached == 5
        assert (out / "_rejects.jsonl").read_text() == rejects
    part = out / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:100])
    result = runner.invoke(app, ["cache", "info", str(out)])
    assert result.exit_code == 2 and "part 0 is damaged" in result.output
    assert "Traceback" not in result.output
    manifest = out / "_manifest.json"
    manifest.write_text(json.dumps({"format": "minorsft-parts"}))
    result = runner.invoke(app, ["cache", "info", str(out)])
    assert result.exit_code == 2 and "damaged manifest (no settings" in result.output


def test_a_manifest_given_as_the_cache_points_to_its_folder(parts_cache):
    """`cache info CACHE/_manifest.json` said "not a readable Parquet file ... if it is SFT
    data, precompute turns it into a cache"."""
    result = CliRunner().invoke(app, ["cache", "info", str(parts_cache / "_manifest.json")])
    assert result.exit_code == 2
    assert f"a cache's manifest, not a cache; give its folder, {parts_cache}" in " ".join(
        result.output.split())
