"""`rlpost eval` and `rlpost decontaminate` through the CLI entry point: oracle checks of the real
benchmarks, planted errors, comparisons, one-line errors (exit 2) and planted contamination."""

import json

import pytest

from rlpost.cli import main
from rlpost.evaluation import benchmarks
from rlpost.evaluation.benchmarks import Benchmark, load_benchmark


def _results(directory):
    return json.loads((directory / "results.json").read_text())


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_oracle_gsm8k_scores_every_reference(tmp_path, capsys):
    assert main(["eval", "--benchmark", "gsm8k", "--oracle", "--output-dir", str(tmp_path)]) == 0
    saved = _results(tmp_path)
    assert saved["config"]["rows"] == 1319 and saved["config"]["oracle"]
    assert saved["figures"]["accuracy"]["value"] == 1.0
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 1319
    assert "| accuracy | 1.0000 |" in (tmp_path / "results.md").read_text()
    assert "accepts all 1319 references" in capsys.readouterr().out


def test_oracle_humaneval_scores_every_reference(tmp_path):
    assert main(["eval", "--benchmark", "humaneval", "--oracle", "--output-dir", str(tmp_path)]) == 0
    saved = _results(tmp_path)
    assert saved["config"]["rows"] == 164 and saved["figures"]["accuracy"]["value"] == 1.0


def test_planted_wrong_gsm8k_reference_fails_naming_the_row(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmarks, "_LOADERS", dict(benchmarks._LOADERS))

    def planted() -> Benchmark:
        rows = [dict(r) for r in load_benchmark("gsm8k", limit=12).rows]
        rows[7]["reference"] = rows[7]["reference"].rsplit("####", 1)[0] + "#### 99999"
        return Benchmark("gsm8k_planted", rows)

    benchmarks.register_benchmark("gsm8k_planted", planted)
    assert main(["eval", "--benchmark", "gsm8k_planted", "--oracle", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip().endswith("1 of 12 references score below 1: row 7")
    assert [f["row"] for f in _results(tmp_path)["oracle_failures"]] == [7]


def test_planted_wrong_humaneval_reference_in_a_dataset(tmp_path, capsys):
    rows = [{"question": "def add(a, b):\n", "gold": "    return a + b\n", "entry_point": "add",
             "test": f"def check(f):\n    assert f(2, {i}) == {2 + i}\n"} for i in range(3)]
    rows[2]["gold"] = "    return a - b\n"
    data = _write_jsonl(tmp_path / "code.jsonl", rows)
    argv = ["eval", "--dataset", str(data), "--verifier", "humaneval", "--column", "prompt=question",
            "--column", "reference=gold", "--oracle", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip().endswith("1 of 3 references score below 1: row 2")
    assert _results(tmp_path / "out")["config"]["dataset"]["columns"] == {"prompt": "question", "reference": "gold"}


def test_compare_prints_differences_and_overlap(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    assert main(["eval", "--benchmark", "addition", "--oracle", "--limit", "30", "--output-dir", str(good)]) == 0
    rows = load_benchmark("addition", limit=30).rows
    wrong = [{"prompt": r["prompt"], "answer": r["answer"], "reference": r["answer"] if i < 5 else "x"}
             for i, r in enumerate(rows)]
    data = _write_jsonl(tmp_path / "wrong.jsonl", wrong)
    assert main(["eval", "--dataset", str(data), "--verifier", "addition", "--oracle",
                 "--output-dir", str(bad)]) == 1
    capsys.readouterr()
    assert main(["eval", "--compare", str(good), str(bad / "results.json")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("accuracy"))
    assert "1.0000" in line and "0.1667" in line and "-0.8333" in line and "disjoint" in line
    assert "warning: benchmark differs" in out
    assert main(["eval", "--compare", str(good), str(good)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("accuracy"))
    assert "+0.0000" in line and "overlap" in line


def test_addition_oracle_uses_the_task_config(tmp_path):
    config = {"seed": 2, "data.source": "task", "eval": [{"benchmark": "held_out", "limit": 50}],
              "grpo.max_completion_length": 6, "data.task.max_operand": 30, "data.task.held_out_percent": 25,
              "data.task.reverse": False, "data.task.carry_slip": 0.1}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(config))
    argv = ["eval", "--benchmark", "addition", "--oracle", "--task-config", str(path),
            "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    saved = _results(tmp_path / "out")["config"]
    assert saved["benchmark_options"]["max_operand"] == 30 and saved["rows"] == 50
    assert saved["decoding"]["max_tokens"] == 6 and saved["task_config"] == str(path.resolve())


@pytest.mark.parametrize("argv, named", [
    (["eval", "/no/such/model", "--benchmark", "gsm8k"], "/no/such/model"),
    (["eval", "--benchmark", "gsm9k", "--oracle"], "gsm9k"),
    (["eval", "--benchmark", "ifeval", "--oracle"], "ifeval"),
    (["eval", "--compare", "/no/a", "/no/b"], "/no/a"),
])
def test_errors_exit_2_naming_the_thing(argv, named, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


def test_dataset_missing_mapped_column_exits_2(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1=", "final": "2"}])
    argv = ["eval", "--dataset", str(data), "--verifier", "math", "--column", "prompt=question",
            "--column", "reference=answer", "--oracle"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'answer'" in err and "question, final" in err


def test_decontaminate_finds_planted_overlaps(tmp_path, capsys):
    questions = [r["question"] for r in load_benchmark("gsm8k").rows]
    rows = [{"text": f"a harmless training sentence number {i} with nothing to hide"} for i in range(40)]
    rows[5]["text"] = "Please solve: " + questions[100]
    rows[33]["text"] = questions[1318].lower() + " Think step by step."
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    report = tmp_path / "report.json"
    argv = ["decontaminate", "--train", f"{data}:text", "--benchmarks", "gsm8k,ifeval", "--json", str(report)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "gsm8k (question, 1319 rows): 2 training rows overlap 2 benchmark rows" in out
    assert "ifeval (prompt, 541 rows): 0 training rows" in out
    saved = json.loads(report.read_text())
    pairs = {(e["train_index"], e["bench_index"]) for e in saved["benchmarks"]["gsm8k"]["examples"]}
    assert pairs == {(5, 100), (33, 1318)} and saved["contaminated_train_indices"] == [5, 33]
    assert main(argv + ["--fail-on-overlap"]) == 1
    assert main(["decontaminate", "--train", f"{data}:body", "--benchmarks", "gsm8k"]) == 2
    assert "no field 'body'" in capsys.readouterr().err


def test_addition_keeps_the_runs_prompt_format_and_refuses_a_chat_template_flag(tmp_path, capsys):
    config = {"seed": 0, "data.source": "task", "eval": [{"benchmark": "held_out", "limit": 20}],
              "data.task.max_operand": 30, "data.task.held_out_percent": 25, "data.task.reverse": False,
              "data.task.carry_slip": 0.1, "data.prompt.template": "add: {prompt}"}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(config))
    argv = ["eval", "--benchmark", "addition", "--oracle", "--task-config", str(path)]
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 0
    assert _results(tmp_path / "out")["config"]["prompt_format"]["template"] == "add: {prompt}"
    capsys.readouterr()
    assert main([*argv, "--chat-template", "off", "--output-dir", str(tmp_path / "off")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the line naming the task settings' file
    assert "data.prompt" in last and "--chat-template off" in last
