import json

import datasets
import pytest

from alignlab.data.loading import load_rows

ROWS = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(10)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")  # keep datasets' cache out of the user's home


def test_jsonl_file(tmp_path, cache):
    path = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    ds = load_rows(str(path), cache_dir=cache)
    assert isinstance(ds, datasets.Dataset) and ds.to_list() == ROWS


def test_json_parquet_and_csv_files(tmp_path, cache):
    reference = datasets.Dataset.from_list(ROWS)
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    reference.to_parquet(str(tmp_path / "a.parquet"))
    reference.to_csv(str(tmp_path / "a.csv"), index=False)
    for name in ("a.json", "a.parquet", "a.csv"):
        assert load_rows(str(tmp_path / name), cache_dir=cache).to_list() == ROWS, name


def test_slices_of_a_single_file(tmp_path, cache):
    path = str(write_jsonl(tmp_path / "sft.jsonl", ROWS))
    assert load_rows(path, "train[:90%]", cache_dir=cache).to_list() == ROWS[:9]
    assert load_rows(path, "train[-2:]", cache_dir=cache).to_list() == ROWS[-2:]
    assert load_rows(path, "train[:2]+train[-1:]", cache_dir=cache).to_list() == ROWS[:2] + ROWS[-1:]


def test_a_single_file_has_only_a_train_split(tmp_path, cache):
    path = str(write_jsonl(tmp_path / "sft.jsonl", ROWS))
    with pytest.raises(ValueError, match=r"no split test; available: train.*single file"):
        load_rows(path, "test", cache_dir=cache)


def test_directory_maps_split_names_to_files(tmp_path, cache):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:8])
    write_jsonl(tmp_path / "test.jsonl", ROWS[8:])
    assert load_rows(str(tmp_path), cache_dir=cache).to_list() == ROWS[:8]
    assert load_rows(str(tmp_path), "test", cache_dir=cache).to_list() == ROWS[8:]
    assert load_rows(str(tmp_path), "train[:50%]", cache_dir=cache).to_list() == ROWS[:4]
    with pytest.raises(ValueError, match="no split validation; available: test, train"):
        load_rows(str(tmp_path), "validation", cache_dir=cache)


def test_directory_of_sharded_files(tmp_path, cache):
    data = tmp_path / "data"
    data.mkdir()
    for shard in range(2):
        part = datasets.Dataset.from_list(ROWS[shard * 5 : (shard + 1) * 5])
        part.to_parquet(str(data / f"train-0000{shard}-of-00002.parquet"))
    assert load_rows(str(data), cache_dir=cache).to_list() == ROWS


def test_directory_without_split_names_is_one_train_split(tmp_path, cache):
    write_jsonl(tmp_path / "part_a.jsonl", ROWS[:3])
    write_jsonl(tmp_path / "part_b.jsonl", ROWS[3:])
    assert load_rows(str(tmp_path), cache_dir=cache).to_list() == ROWS


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert load_rows(str(tmp_path / "single")).to_list() == ROWS
    assert load_rows(str(tmp_path / "single"), "train[20%:40%]").to_list() == ROWS[2:4]
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:6]), "test": datasets.Dataset.from_list(ROWS[6:])}
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_rows(str(tmp_path / "dict"), "test").to_list() == ROWS[6:]
    assert load_rows(str(tmp_path / "dict"), "train[:1]+test[-1:]").to_list() == [ROWS[0], ROWS[-1]]


@pytest.mark.parametrize("source", ["/no/such/file.jsonl", "./missing", "../missing", "~/no_such_alignlab"])
def test_missing_local_paths(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(source)


def test_a_relative_name_with_a_file_suffix_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'data.parquet'"):
        load_rows("data.parquet")


def test_bad_json_line_names_file_and_line(tmp_path, cache):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",\n{"text": "d"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: not valid JSON") as info:
        load_rows(str(path), cache_dir=cache)
    assert str(path) in str(info.value)


def test_bad_json_file_names_the_file(tmp_path, cache):
    path = tmp_path / "bad.json"
    path.write_text('[{"text": "a"}, {"text": ')
    with pytest.raises(ValueError, match=r"cannot read .*bad\.json as json"):
        load_rows(str(path), cache_dir=cache)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_rows(str(path))


def test_config_name_is_for_hub_datasets_only(tmp_path, cache):
    path = str(write_jsonl(tmp_path / "sft.jsonl", ROWS))
    with pytest.raises(ValueError, match="hub dataset config"):
        load_rows(path, name="harmless-base", cache_dir=cache)


def test_hub_names_go_to_load_dataset(monkeypatch):
    calls = []
    # Stand in for the network call only; load_rows' own hub branch still runs.
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kw: calls.append((args, kw)) or "ds")
    assert load_rows("Anthropic/hh-rlhf", "test", name="harmless-base") == "ds"
    assert calls == [(("Anthropic/hh-rlhf", "harmless-base"), {"split": "test", "cache_dir": None})]
