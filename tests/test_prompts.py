"""Prompt sources: text, CSV, JSON lines, JSON (HPDv2 / HPSv2 benchmark layouts), Parquet / Arrow, dataset
folders (save_to_disk and hub-style Parquet shards, e.g. Pick-a-Pic), and their errors."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardtune.errors import UserError
from rewardtune.prompts import read_prompts


def test_text_csv_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog \n")
    (tmp_path / "p.csv").write_text("id,caption\n1,a cat\n2,a dog\n")
    (tmp_path / "p.jsonl").write_text('"a cat"\n{"prompt": "a dog"}\n')
    for name in ("p.txt", "p.csv", "p.jsonl"):
        assert read_prompts(tmp_path / name) == ["a cat", "a dog"]


def test_hpdv2_train_json_and_benchmark_folder(tmp_path):
    train = [{"prompt": "a castle", "human_preference": [0, 1], "image_path": ["0.jpg", "1.jpg"]},
             {"prompt": "a lake", "human_preference": [1, 0], "image_path": ["2.jpg", "3.jpg"]}]
    (tmp_path / "train.json").write_text(json.dumps(train))
    assert read_prompts(tmp_path / "train.json") == ["a castle", "a lake"]
    bench = tmp_path / "benchmark"
    bench.mkdir()
    (bench / "photo.json").write_text(json.dumps(["a photo of a fox"]))
    (bench / "anime.json").write_text(json.dumps(["an anime girl", "an anime robot"]))
    assert read_prompts(bench) == ["an anime girl", "an anime robot", "a photo of a fox"]  # file-name order
    (tmp_path / "styles.json").write_text(json.dumps({"anime": ["x"], "photo": ["y", "z"]}))
    assert read_prompts(tmp_path / "styles.json") == ["x", "y", "z"]


def test_pickapic_parquet_shards_pick_split_and_dedupe(tmp_path):
    data = tmp_path / "pickapic_v1" / "data"
    data.mkdir(parents=True)
    for name, captions in [("train-00000-of-00002.parquet", ["a red car", "a red car", "a tree"]),
                           ("train-00001-of-00002.parquet", ["a boat"]),
                           ("test_unique-00000-of-00001.parquet", ["a test prompt"])]:
        pq.write_table(pa.table({"caption": captions, "label_0": [0.5] * len(captions)}), data / name)
    root = tmp_path / "pickapic_v1"
    assert read_prompts(root) == ["a red car", "a red car", "a tree", "a boat"]
    assert read_prompts(root, unique=True) == ["a red car", "a tree", "a boat"]
    assert read_prompts(root, split="test_unique") == ["a test prompt"]
    with pytest.raises(UserError, match="no split 'validation'.*test_unique"):
        read_prompts(root, split="validation")
    assert read_prompts(data / "train-00001-of-00002.parquet") == ["a boat"]


def test_save_to_disk_dataset_folders(tmp_path):
    ds = datasets.Dataset.from_dict({"prompt": ["a cat", "a dog"], "score": [1, 2]})
    ds.save_to_disk(tmp_path / "single")
    assert read_prompts(tmp_path / "single") == ["a cat", "a dog"]
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(tmp_path / "dict")
    assert read_prompts(tmp_path / "dict", split="test") == ["a dog"]
    with pytest.raises(UserError, match="no split 'valid'"):
        read_prompts(tmp_path / "dict", split="valid")


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "\n \n", "holds no prompt"),
    ("bad.json", "[1, 2", "not valid JSON"),
    ("numbers.json", "[1, 2]", "item 0 has no string field"),
    ("nocol.csv", "id,label\n1,x\n", "no prompt column"),
    ("bad.jsonl", '{"prompt": "a"}\nnot json\n', "line 2 is not valid JSON"),
])
def test_bad_sources_raise_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=message) as info:
        read_prompts(tmp_path / name)
    assert "\n" not in str(info.value)


def test_named_column_and_corrupt_parquet(tmp_path):
    pq.write_table(pa.table({"caption": ["a"], "negative": ["b"]}), tmp_path / "t.parquet")
    assert read_prompts(tmp_path / "t.parquet", column="negative") == ["b"]
    with pytest.raises(UserError, match="no 'prompt2' column"):
        read_prompts(tmp_path / "t.parquet", column="prompt2")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="cannot read prompts"):
        read_prompts(tmp_path / "bad.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="holds no prompt files"):
        read_prompts(tmp_path / "empty_dir")


def test_shipped_sets_by_name():
    animals = read_prompts("animals45")
    assert len(animals) == 45 and animals[0] == "A painting of a cat" and animals[-1] == "A painting of a kangaroo"
    assert len(set(animals)) == 45
    with pytest.raises(UserError, match="not found.*animals45"):
        read_prompts("no_such_set")
