"""Which files `--data` names, and in what order their rows are read.

One file; a folder (its data files, by name); a glob pattern (its matches, by name: Hugging
Face's sharded data sets, `data/train-*.parquet`); several names (the files a shell made of an
unquoted pattern, or `--data` repeated), read in the order given; or a built-in data set.

Several files that belong to different splits (train and test, ...) are refused, so that a run
never trains on a test split because it lay beside the training files.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
from importlib import resources
from pathlib import Path

from minorsft.data_errors import DataError

BUILTIN_DATA = {"demo": "demo.jsonl", "demo-heldout": "demo_heldout.jsonl"}
# What a folder is read for (not .json: a saved data set's folder holds dataset_info.json and
# state.json; a pattern or a file name reads .json as JSON Lines)
FOLDER_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".parquet")
# Hugging Face names a split's shards {split}-00000-of-00004.parquet: the split is the prefix
HF_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}")
# Otherwise a split is a word of the name (gsm8k_train.jsonl, test.jsonl), the last one found
SPLIT_WORDS = {"train": "train", "training": "train", "test": "test", "testing": "test",
               "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "dev", "eval": "eval", "evaluation": "eval", "holdout": "held-out",
               "heldout": "held-out"}
JOIN_HINT = ("to read several splits on purpose, join them into one file first (python -c "
             "\"import polars as pl; pl.read_parquet('dir/*.parquet').write_parquet("
             "'all.parquet')\", or cat a.jsonl b.jsonl > all.jsonl)")


def resolve_data(names: str | list[str], prefer_split: str = "train") -> list[Path]:
    """The input files `names` (one `--data` value, or several) stand for, in reading order.

    Refuses a name that gives no file, a file named twice, and files of several splits (the
    message suggests a pattern for the `prefer_split` one)."""
    given = [names] if isinstance(names, str) else list(names)
    files = [path for name in given for path in _resolve_one(name)]
    seen: set[Path] = set()
    for path in files:
        if path.resolve() in seen:
            raise DataError(str(path), None, None, "named twice in --data (its rows would be "
                            "read twice)")
        seen.add(path.resolve())
    _refuse_caches(files)
    if len(files) > 1:
        _refuse_several_splits(files, " ".join(given), prefer_split)
    return files


def _refuse_caches(files: list[Path]) -> None:
    """A cache given as input (a pattern matched a cache's parts, say): its rows would each be
    rejected as of an unknown format."""
    from minorsft.cache import is_single_file_cache  # (reads the Parquet footer only)

    for path in files:
        if path.suffix == ".parquet" and is_single_file_cache(path):
            what = (f"a part of the minorsft cache {path.parent}"
                    if any(path.parent.glob("_manifest*.json")) else "a minorsft cache")
            raise DataError(str(path), None, None, f"is {what}, not input data (train reads "
                            "a cache as --cache; eval as --reference)")


def _resolve_one(name: str) -> list[Path]:
    if name in BUILTIN_DATA:
        if not Path(name).exists():
            return [Path(str(resources.files("minorsft.assets") / BUILTIN_DATA[name]))]
        if Path(name).is_file():  # (no file type: the reader would refuse it, naming none)
            raise DataError(name, None, None, f"a file without a type (.jsonl, .parquet) hides "
                            f"the built-in data set {name!r} here: rename it (say "
                            f"{name}.jsonl), or run from another folder to use the built-in")
        try:  # a folder of that name here is what the user has: it wins
            return _resolve_path(name)
        except DataError as error:
            raise DataError(error.path, error.line, error.field, f"{error.reason} (this "
                            f"{name!r} here hides the built-in data set {name!r}: run from "
                            "another folder to use that)") from None
    return _resolve_path(name)


def _resolve_path(name: str) -> list[Path]:
    path = Path(name).expanduser()
    if any(char in name for char in "*?[") and not path.exists():
        found = sorted(Path(match) for match in glob.glob(str(path), recursive=True))
        files = [match for match in found if match.is_file()]
        for folder in (match for match in found if match.is_dir()):  # as the folder's files
            files += _folder_files(folder, quiet=True)
        if not files:
            raise DataError(str(path), None, None, "no file matches this pattern")
        return sorted(files) if len(files) > len(found) else files
    if not path.exists():
        raise DataError(str(path), None, None, "no such file")
    if path.is_dir():
        return _folder_files(path)
    return [path]


def _folder_files(folder: Path, quiet: bool = False) -> list[Path]:
    """The data files directly in `folder`, by name (none, refused unless `quiet`)."""
    if any(folder.glob("_manifest*.json")):
        raise DataError(str(folder), None, None, "is a minorsft cache, not input data (train "
                        "reads it as --cache; eval as --reference)")
    files = sorted(child for child in folder.iterdir()
                   if child.is_file() and child.name.lower().endswith(FOLDER_SUFFIXES)
                   and not child.name.startswith((".", "_")))
    if not files and not quiet:
        folders = sorted(child.name for child in folder.iterdir()
                         if child.is_dir() and not child.name.startswith((".", "_")))
        inside = f"; it holds the folders {', '.join(folders[:5])}: name one" if folders else ""
        raise DataError(str(folder), None, None, "is a folder with no .jsonl, .ndjson (or "
                        f"either .gz) or .parquet file in it{inside} (for other names, give a "
                        "pattern: "
                        f"--data '{folder / '*.json'}')")
    return files


def split_of(path: Path) -> str | None:
    """The split a file's name (else its folder's) says it holds, if any."""
    for name in (path.name, path.parent.name):
        lowered = name.lower()
        if match := HF_SHARD.match(lowered):
            return match["split"]
        words = [SPLIT_WORDS[word] for word in re.split(r"[^a-z]+", lowered) if word in SPLIT_WORDS]
        if words:
            return words[-1]
    return None


def _refuse_several_splits(files: list[Path], given: str, prefer: str) -> None:
    by_split: dict[str, list[Path]] = {}
    for path in files:
        if (split := split_of(path)) is not None:
            by_split.setdefault(split, []).append(path)
    if len(by_split) < 2:
        return
    one = next((split for split in by_split if split.split("_")[0] == prefer),
               sorted(by_split)[0])
    members = by_split[one]
    others = {path for split, paths in by_split.items() if split != one for path in paths}
    patterns = []  # {split}-*, for the shards of any count; the files' common start
    if HF_SHARD.match(members[0].name.lower()):
        patterns.append(str(members[0].parent / (members[0].name[:len(one) + 1] + "*")))
    if len(members) > 1 and (prefix := os.path.commonprefix([p.name for p in members])):
        patterns.append(str(members[0].parent / (prefix + "*")))
    # one that names exactly these files (gsm8k_train.jsonl beside train-0000*: none does)
    matched = {pattern: {Path(match) for match in glob.glob(pattern)} for pattern in patterns}
    hint = next((f"--data '{pattern}' (quoted, so that minorsft, not the shell, expands it)"
                 for pattern, found in matched.items()
                 if found & set(files) == set(members) and not found & others), None)
    if hint is None and len(members) <= 4:
        hint = " ".join(f"--data {shlex.quote(str(path))}" for path in members)
    elif hint is None:
        hint = f"the {len(members)} {one} files (their own folder, say)"
    counts = ", ".join(f"{split} ({len(paths)} file{'s' * (len(paths) > 1)})"
                       for split, paths in sorted(by_split.items()))
    raise DataError(given, None, None, (
        f"names files of several splits: {counts}; name the files of one, e.g. {hint}; "
        f"{JOIN_HINT}"))


def data_source(names: str | list[str]) -> str:
    """`--data` as given, as one string (a pattern, a folder, or the names the shell gave)."""
    return names if isinstance(names, str) else " ".join(names)


def data_label(files: list[Path]) -> str:
    """The input as one name for messages: the file, or the first of several and their
    count."""
    if len(files) == 1:
        return str(files[0])
    return f"{files[0]} and {len(files) - 1} more file{'s' * (len(files) > 2)}"
