"""Load raw rows through `datasets`: a local file, a local directory, or a hub dataset name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pyarrow as pa

from alignlab.errors import MissingInputError

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# A missing path with one of these suffixes was meant to be a file; hub names carry none of them.
_FILE_SUFFIXES = {*_BUILDERS, ".txt", ".tsv", ".arrow", ".gz", ".zst"}
_LOCAL_PREFIXES = ("/", "./", "../", "~")
_SHARD = re.compile(r"-\d+-of-\d+$")  # train-00000-of-00004.parquet is one shard of split "train"
_SPLIT_NAMES = {"train", "test", "validation", "valid", "val", "dev", "eval"}


def load_rows(
    source: str, split: str = "train", *, name: str | None = None, cache_dir: str | None = None
) -> datasets.Dataset:
    """Load one split (or slice, "train[:90%]") of a local file or directory, or of a hub dataset."""
    path = Path(source).expanduser()
    if path.exists():
        if name is not None:
            raise ValueError(f"name={name!r} selects a hub dataset config; {path} is local")
        if path.is_dir():
            return _load_dir(path, split, cache_dir)
        return _load_files(_builder(path), {"train": [path]}, split, path, cache_dir)
    require_source(source)
    return datasets.load_dataset(source, name, split=split, cache_dir=cache_dir)


def require_source(source: str) -> None:
    """A MissingInputError for a source that reads as a local file or folder but is not there (a hub dataset name
    has no path prefix and no file suffix)."""
    path = Path(source).expanduser()
    if not path.exists() and (source.startswith(_LOCAL_PREFIXES) or path.suffix.lower() in _FILE_SUFFIXES):
        raise MissingInputError(f"data.source={source!r} looks like a local path, but {path} does not exist")


def _builder(path: Path) -> str:
    try:
        return _BUILDERS[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"{path}: unsupported file type; use one of {', '.join(_BUILDERS)}") from None


def _split_names(split: str) -> set[str]:
    """Split names a spec refers to: "train[:90%]+test" -> {"train", "test"}."""
    return {part.split("[")[0].strip() for part in split.split("+")}


def _check_splits(split: str, available: set[str], where: Path) -> None:
    unknown = _split_names(split) - available
    if unknown:
        raise ValueError(
            f"{where}: no split {', '.join(sorted(unknown))}; available: {', '.join(sorted(available))}"
            " (a single file is split 'train'; take part of it with a slice such as 'train[:90%]')"
        )


def _load_dir(path: Path, split: str, cache_dir: str | None) -> datasets.Dataset:
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        return _load_saved(path, split)
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in _BUILDERS)
    if not files:
        kinds = ", ".join(_BUILDERS)
        raise ValueError(f"{path}: neither a save_to_disk dataset nor a folder of {kinds} files")
    builders = {_BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise ValueError(f"{path}: mixes file types ({', '.join(sorted(builders))}); keep one per folder")
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(_SHARD.sub("", f.stem), []).append(f)
    if not groups.keys() & _SPLIT_NAMES:  # no file is named after a split: the folder is one split
        groups = {"train": files}
    return _load_files(builders.pop(), groups, split, path, cache_dir)


def _load_files(
    builder: str, groups: dict[str, list[Path]], split: str, where: Path, cache_dir: str | None
) -> datasets.Dataset:
    _check_splits(split, set(groups), where)
    wanted = {k: groups[k] for k in sorted(_split_names(split))}  # read only the splits asked for
    data_files = {k: [str(f) for f in files] for k, files in wanted.items()}
    try:
        return datasets.load_dataset(builder, data_files=data_files, split=split, cache_dir=cache_dir)
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowException) as e:
        raise ValueError(_read_error([f for files in wanted.values() for f in files], builder, e)) from e


def _read_error(files: list[Path], builder: str, error: Exception) -> str:
    """Name the file and, for JSON lines, the first line that does not parse."""
    for f in files:
        if f.suffix.lower() == ".jsonl" and (bad := _first_bad_json_line(f)):
            return f"{f}, line {bad[0]}: not valid JSON ({bad[1]})"
    while error.__cause__ is not None:  # datasets wraps the reader's own, more specific error
        error = error.__cause__
    return f"cannot read {', '.join(map(str, files))} as {builder}: {error}"


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    return number, e.msg
    return None


def _load_saved(path: Path, split: str) -> datasets.Dataset:
    """Load a save_to_disk folder and apply the split spec the way load_dataset would."""
    loaded = datasets.load_from_disk(str(path))
    splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    _check_splits(split, set(splits), path)
    sizes = {k: len(v) for k, v in splits.items()}
    parts = []
    for ins in datasets.ReadInstruction.from_spec(split).to_absolute(sizes):
        part = splits[ins.splitname]
        parts.append(part if (ins.from_, ins.to) == (0, len(part)) else part.select(range(ins.from_, ins.to)))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
