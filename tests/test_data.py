"""Prompt datasets: every source kind, column mapping, each input error, and the DatasetPrompts stream."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import pytest

from rlpost.data import SPLITS, DatasetPrompts, read_rows
from rlpost.errors import UserError
from rlpost.evaluation.benchmarks import load_gsm8k

ROWS = [
    {"question": "1+1?", "gold": "2", "tags": ["easy"]},
    {"question": "2+2?", "gold": "4", "tags": []},
    {"question": "3+3?", "gold": "6", "tags": ["x", "y"]},
]
MAPPED = [{"prompt": r["question"], "gold": r["gold"], "tags": r["tags"]} for r in ROWS]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_parquet(path: Path, rows: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- source kinds


def test_jsonl_with_a_prompt_column_keeps_every_column(tmp_path):
    rows = [{"prompt": "hi", "answer": 3, "meta": {"k": 1}}]
    assert read_rows(str(_write_jsonl(tmp_path / "d.jsonl", rows))) == rows


def test_jsonl_mapping_renames_and_keeps_the_other_columns(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert read_rows("d.jsonl", columns={"prompt": "question"}, base_dir=tmp_path) == MAPPED
    renamed = read_rows(str(tmp_path / "d.jsonl"), columns={"prompt": "question", "answer": "gold"})
    assert renamed[0] == {"prompt": "1+1?", "answer": "2", "tags": ["easy"]}


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    _write_jsonl(tmp_path / "d.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    assert read_rows("d.jsonl", columns={"prompt": "question"}) == MAPPED


def test_parquet(tmp_path):
    path = _write_parquet(tmp_path / "d.parquet", ROWS)
    assert read_rows(str(path), columns={"prompt": "question"}) == MAPPED


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert read_rows("single", columns={"prompt": "question"}, base_dir=tmp_path) == MAPPED
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "multi"))
    test = read_rows(str(tmp_path / "multi"), split="test", columns={"prompt": "question"})
    assert test == MAPPED[:1]
    with pytest.raises(UserError, match="splits: train, test"):
        read_rows(str(tmp_path / "multi"), columns={"prompt": "question"})


def test_gsm8k_train_has_the_final_answer_and_the_solution():
    rows = read_rows("gsm8k-train")
    assert len(rows) == 7473
    first = rows[0]
    assert set(first) == {"prompt", "question", "solution", "answer"}
    assert first["answer"] == "72" and first["solution"].endswith("#### 72")
    assert first["prompt"].endswith(f"Question: {first['question']}\nAnswer:")


def test_gsm8k_test_prompts_are_the_zero_shot_evaluation_prompts():
    rows = read_rows("gsm8k-test")
    bench = load_gsm8k(num_fewshot=0)
    assert len(rows) == 1319
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in bench.rows]
    assert [r["answer"] for r in rows] == [r["answer"] for r in bench.rows]


def test_ifeval_rows_carry_the_columns_the_ifeval_reward_reads():
    from rewards.ifeval.reward import ifeval_strict_reward

    rows = read_rows("ifeval")
    assert len(rows) == 541
    assert set(rows[0]) == {"prompt", "key", "instruction_id_list", "kwargs"}
    batch = rows[:3]
    columns = {c: [r[c] for r in batch] for c in ("instruction_id_list", "kwargs")}
    scores = ifeval_strict_reward([r["prompt"] for r in batch], ["ok"] * 3, **columns)
    assert all(s is not None and 0 <= s <= 1 for s in scores)


# ---------------------------------------------------------------- errors


def test_missing_file_and_unknown_split_name(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl does not exist") as err:
        read_rows("nope.jsonl", base_dir=tmp_path)
    assert str(tmp_path) in _one_line(err)
    with pytest.raises(UserError) as err:
        read_rows("gsm8k-dev", base_dir=tmp_path)
    message = _one_line(err)
    assert "'gsm8k-dev'" in message and all(name in message for name in SPLITS)


def test_unsupported_file_type_and_split_on_a_file(tmp_path):
    (tmp_path / "d.csv").write_text("prompt\nhi\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.csv: unsupported dataset file type '\.csv'; use a \.jsonl"):
        read_rows("d.csv", base_dir=tmp_path)
    _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi"}])
    with pytest.raises(UserError, match="single file without splits; remove split='train'"):
        read_rows("d.jsonl", split="train", base_dir=tmp_path)
    with pytest.raises(UserError, match="not one saved with save_to_disk"):
        read_rows(str(tmp_path))


def test_non_utf8_file_names_the_line_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    raw = b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'
    path.write_bytes(raw)
    with pytest.raises(UserError) as err:
        read_rows(str(path))
    message = _one_line(err)
    assert str(path) in message and "not UTF-8" in message
    offset = raw.index(b"\xe9")
    assert "line 2" in message and f"byte offset {offset} " in message


def test_bad_jsonl_lines_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl line 3 is not valid JSON"):
        read_rows(str(path))
    path.write_text('{"prompt": "a"}\n["prompt"]\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl line 2 is not a JSON object"):
        read_rows(str(path))


def test_corrupt_parquet_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"broken\.parquet cannot be read"):
        read_rows(str(path))


def test_row_without_a_prompt_names_file_row_column_and_columns(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "x": 1}, {"text": "b", "x": 2}])
    with pytest.raises(UserError) as err:
        read_rows(str(path))
    message = _one_line(err)
    assert str(path) in message and "row 1" in message and "'prompt'" in message
    assert "columns are: text, x" in message


@pytest.mark.parametrize("value, named", [("   ", "empty prompt"), (None, "holds NoneType"),
                                          (["chat"], "holds list")])
def test_empty_or_non_text_prompt_names_file_row_and_mapped_column(tmp_path, value, named):
    rows = [*ROWS[:2], {"question": value, "gold": "6", "tags": []}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError) as err:
        read_rows(str(path), columns={"prompt": "question"})
    message = _one_line(err)
    assert str(path) in message and "row 2" in message and "'question'" in message and named in message
    assert "columns are: question, gold, tags" in message


def test_mapped_column_that_does_not_exist(tmp_path):
    path = _write_parquet(tmp_path / "d.parquet", ROWS)
    with pytest.raises(UserError) as err:
        read_rows(str(path), columns={"prompt": "query"})
    message = _one_line(err)
    assert str(path) in message and "'query' (mapped to 'prompt') not found" in message
    assert "columns are: question, gold, tags" in message


def test_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"empty\.jsonl has no rows"):
        read_rows("empty.jsonl", base_dir=tmp_path)


# ---------------------------------------------------------------- DatasetPrompts


def _prompts(n: int, seed: int = 0) -> DatasetPrompts:
    return DatasetPrompts(tuple({"prompt": f"p{i}", "answer": str(i)} for i in range(n)), seed)


def test_get_returns_the_raw_prompt_and_the_other_columns():
    prompt, columns = _prompts(1).get(0)
    assert prompt == "p0" and columns == {"answer": "0"}


def test_every_epoch_visits_every_row_once_in_a_fresh_order():
    stream = _prompts(10, seed=3)
    epochs = [[stream.get(e * 10 + j)[0] for j in range(10)] for e in range(3)]
    assert all(sorted(epoch) == sorted(f"p{i}" for i in range(10)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    counts = Counter(stream.get(i)[0] for i in range(50))
    assert set(counts.values()) == {5}


def test_order_is_deterministic_by_seed_and_a_resumed_stream_continues_exactly():
    first = [_prompts(7, seed=1).get(i) for i in range(30)]
    resumed = _prompts(7, seed=1)
    assert [resumed.get(i) for i in range(12, 30)] == first[12:]
    assert first == [_prompts(7, seed=1).get(i) for i in range(30)]
    assert [p for p, _ in first] != [_prompts(7, seed=2).get(i)[0] for i in range(30)]


def test_pickles_and_reads_a_dataset(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", ROWS)
    stream = DatasetPrompts.read("d.jsonl", seed=5, columns={"prompt": "question"}, base_dir=tmp_path)
    assert len(stream) == 3
    copy = pickle.loads(pickle.dumps(stream))
    assert [copy.get(i) for i in range(6)] == [stream.get(i) for i in range(6)]
    prompt, columns = stream.get(0)
    assert {"prompt": prompt, **columns} in MAPPED


def test_bad_stream_settings():
    with pytest.raises(UserError, match="at least one row"):
        DatasetPrompts(())
    with pytest.raises(UserError, match="seed must be an integer >= 0"):
        _prompts(2, seed=-1)
    with pytest.raises(IndexError):
        _prompts(2).get(-1)
