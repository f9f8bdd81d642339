"""Evaluation runner: scoring with the shared verifiers, figures against hand-computed values,
oracle mode, the addition benchmark and run-config detection, contamination checks, and (slow)
a real vLLM evaluation of a tiny model checked against transformers' greedy decoding."""

import json

import pytest

from rlpost.errors import UserError
from rlpost.evaluation.addition import find_run_config, load_addition, task_options
from rlpost.evaluation.benchmarks import Benchmark, load_benchmark
from rlpost.evaluation.decontaminate import check_contamination
from rlpost.evaluation.figures import ratio_interval, summarize
from rlpost.evaluation.metrics import bootstrap_interval, wilson_interval
from rlpost.evaluation.runner import evaluate
from rlpost.evaluation.scoring import SampleScore, score_samples
from rlpost.tasks.arithmetic import AdditionTask

# ---------------------------------------------------------------- figures


def test_ratio_interval_two_clusters_by_hand():
    # Clusters A = 1/1 and B = 0/3. Resampling two clusters gives AA -> 1 (p 1/4),
    # AB -> 1/4 (p 1/2), BB -> 0 (p 1/4): the 2.5% quantile is 0 and the 97.5% quantile is 1.
    assert ratio_interval([1, 0], [1, 3], seed=0) == (0.0, 1.0)
    assert ratio_interval([1, 2], [2, 4]) == (0.5, 0.5)  # every cluster has ratio 1/2


def test_ratio_interval_with_unit_totals_is_the_mean_bootstrap():
    values = [1, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1]
    assert ratio_interval(values, [1] * len(values), seed=3) == pytest.approx(bootstrap_interval(values, seed=3))


def _scores(rows):
    return [[SampleScore(float(c), a) for c, a in row] for row in rows]


def test_pass_and_maj_at_k_by_hand():
    # prompt 0: correct at samples 0 and 3 (c=2); prompt 1: none (c=0); prompt 2: all (c=4).
    scores = _scores([
        [(1, "7"), (0, "3"), (0, "3"), (1, "7")],
        [(0, "1"), (0, "1"), (0, None), (0, "2")],
        [(1, "5"), (1, "5"), (1, "5.0"), (1, "5")],
    ])
    fig = summarize(scores, votable=True)
    assert fig["accuracy"]["value"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert fig["accuracy"]["method"] == "bootstrap over prompts"  # per-prompt means are not all 0/1
    # pass@2 of prompt 0: 1 - C(2,2)/C(4,2) = 5/6.
    assert fig["pass@1"]["value"] == pytest.approx(0.5)
    assert fig["pass@2"]["value"] == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert fig["pass@3"]["value"] == pytest.approx(2 / 3)
    assert fig["pass@4"]["value"] == pytest.approx(2 / 3)
    assert fig["pass@4"]["method"] == "wilson over prompts"
    assert (fig["pass@4"]["low"], fig["pass@4"]["high"]) == pytest.approx(wilson_interval(2, 3))
    # maj@k of prompt 0: k=1 "7" ok; k=2 tie -> first ("7") ok; k=3 "3" wins, wrong; k=4 tie -> "7" ok.
    assert [fig[f"maj@{k}"]["value"] for k in (1, 2, 3, 4)] == pytest.approx([2 / 3, 2 / 3, 1 / 3, 2 / 3])
    assert "maj@2" not in summarize(scores, votable=False)


def test_ifeval_figures_by_hand():
    scores = [
        [SampleScore(0.0, None, (True, False), (True, True))],
        [SampleScore(1.0, None, (True,), (True,))],
    ]
    fig = summarize(scores)
    assert fig["ifeval_prompt_strict"]["value"] == 0.5
    assert fig["ifeval_prompt_loose"]["value"] == 1.0
    assert fig["ifeval_instruction_strict"]["value"] == pytest.approx(2 / 3)
    assert fig["ifeval_instruction_loose"]["value"] == 1.0
    assert fig["ifeval_instruction_strict"]["instructions"] == 3
    assert fig["accuracy"]["value"] == fig["ifeval_prompt_strict"]["value"]


# ---------------------------------------------------------------- scoring with the shared verifiers


def test_score_samples_each_verifier():
    gsm = load_benchmark("gsm8k", limit=1).rows[0]  # answer 18
    rows = [
        gsm,
        {"prompt": "2+3=", "verifier": "addition", "answer": "5", "reference": "5"},
        {"prompt": "Say hi.", "verifier": "ifeval", "instruction_id_list": ["punctuation:no_comma"],
         "kwargs": [{}]},
        {"prompt": "def add(a, b):\n", "verifier": "humaneval", "entry_point": "add",
         "test": "def check(f):\n    assert f(1, 2) == 3\n"},
        {"prompt": "1+1=", "verifier": "arithmetic_exact", "answer": "2"},
    ]
    completions = [
        ["So 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18", "#### 17"],
        [" 5\n", "6"],
        ["hello there", "hello, there"],
        ["    return a + b\n", "    return a - b\n"],
        ["2", "3"],
    ]
    scores = score_samples(rows, completions)
    assert [[s.score for s in row] for row in scores] == [[1, 0]] * 5
    assert [s.answer for s in scores[0]] == ["18", "17"]
    assert [s.answer for s in scores[1]] == ["5", "6"]
    assert scores[2][1].strict == (False,) and scores[2][0].loose == (True,)


def test_score_samples_names_the_row_and_column():
    rows = [{"prompt": "x", "verifier": "addition", "answer": "1"},
            {"prompt": "def f():\n", "verifier": "humaneval", "entry_point": "f"}]
    with pytest.raises(UserError, match=r"row 1 lacks column 'test'"):
        score_samples(rows, [["1"], ["    return 1\n"]])
    with pytest.raises(UserError, match="unknown verifier 'nonesuch'"):
        score_samples([{"prompt": "x", "verifier": "nonesuch"}], [["y"]])


# ---------------------------------------------------------------- oracle mode


def test_oracle_addition_passes_and_a_planted_error_is_named():
    result = evaluate(None, "addition", limit=40, oracle=True)
    assert result.accuracy == 1.0 and result.failed_rows == []
    assert result.config["oracle"] and result.config["rows"] == 40
    rows = [dict(r) for r in load_benchmark("gsm8k", limit=6).rows]
    rows[4]["reference"] = rows[4]["reference"].rsplit("####", 1)[0] + "#### 123456789"
    planted = evaluate(None, Benchmark("gsm8k-planted", rows), oracle=True)
    assert planted.failed_rows == [4]
    assert planted.accuracy == pytest.approx(5 / 6)
    assert planted.to_json()["oracle_failures"][0]["row"] == 4


def test_oracle_refuses_what_it_cannot_check():
    with pytest.raises(UserError, match="ifeval has no reference"):
        evaluate(None, "ifeval", limit=3, oracle=True)
    with pytest.raises(UserError, match="row 1 has no reference"):
        evaluate(None, Benchmark("mine", [{"prompt": "a", "reference": "1", "verifier": "addition"},
                                           {"prompt": "b", "reference": None, "verifier": "addition"}]),
                 oracle=True)
    with pytest.raises(UserError, match="model directory"):
        evaluate(None, "addition", limit=3)
    with pytest.raises(UserError, match="temperature > 0"):
        evaluate(None, "addition", limit=3, n_samples=4, temperature=0.0)


# ---------------------------------------------------------------- the addition benchmark and run configs


RUN_OVERRIDES = ["seed=3", "eval=[{benchmark: held_out, limit: 300}]", "grpo.max_completion_length=6",
                 "data.task.max_operand=50", "data.task.held_out_percent=20", "data.task.reverse=false",
                 "data.task.carry_slip=0.5", "sft.demonstrations=100", "sft.validation_prompts=10"]


def _write_run(run_dir, *overrides: str):
    """A run directory holding recipe.json exactly as `rlpost run` writes it; returns (its path, the recipe)."""
    from rlpost.commands.run import DEFAULT_RECIPE
    from rlpost.pipeline import _check_same_recipe
    from rlpost.recipe import load_recipe

    recipe = load_recipe(DEFAULT_RECIPE, [f"run_dir={run_dir}", *RUN_OVERRIDES, *overrides])
    run_dir.mkdir(parents=True)
    _check_same_recipe(run_dir, recipe)
    return run_dir / "recipe.json", recipe


def test_addition_rows_are_the_runs_held_out_problems(tmp_path):
    from rlpost.training_data import TrainingData

    config, recipe = _write_run(tmp_path / "runs" / "x")
    options, max_tokens = task_options(config)
    assert options == {"max_operand": 50, "held_out_percent": 20, "reverse": False, "carry_slip": 0.5,
                       "seed": 3, "count": 300} and max_tokens == 6
    rows = load_benchmark("addition", limit=25, **options).rows
    held = AdditionTask(50, 20, False, 0.5).held_out(300, 3)[:25]
    assert [(r["prompt"], r["reference"]) for r in rows] == [(p.prompt, p.answer) for p in held]
    assert rows[0]["verifier"] == "addition"
    # exactly the rows the run itself evaluated as `held_out`
    run_rows = TrainingData(recipe.data, recipe.seed).held_out(recipe.eval[0].limit).rows
    assert [r["prompt"] for r in load_benchmark("addition", **options).rows] == [r["prompt"] for r in run_rows]
    with pytest.raises(UserError, match="held_out_prompts"):
        load_addition(max_operand=9, count=1000)


def test_run_config_found_from_policy_paths(tmp_path):
    config, _ = _write_run(tmp_path / "runs" / "x")
    run = config.parent
    for policy in (run / "initial" / "policy", run / "sft" / "policy", run / "grpo" / "policy",
                   run / "grpo" / "checkpoints" / "step-000050" / "policy"):
        policy.mkdir(parents=True)
        (policy / "config.json").write_text("{}")  # the model's own config is not the run's
        assert find_run_config(policy) == config.resolve()
    assert find_run_config(tmp_path / "elsewhere") is None
    dataset_run = tmp_path / "runs" / "d"
    (dataset_run / "grpo" / "policy").mkdir(parents=True)
    (dataset_run / "recipe.json").write_text(json.dumps({"data.source": "prompts.jsonl", "seed": 0}))
    assert find_run_config(dataset_run / "grpo" / "policy") is None  # not a run on the built-in task
    with pytest.raises(UserError, match="not a run on the built-in task"):
        task_options(dataset_run / "recipe.json")
    bad, _ = _write_run(tmp_path / "runs" / "y")
    bad.write_text(json.dumps({"data.source": "task", "seed": 0, "data.task.max_operand": 9}))
    with pytest.raises(UserError, match="data.task.held_out_percent"):
        task_options(bad)


# ---------------------------------------------------------------- contamination


def test_check_contamination_counts_planted_rows():
    questions = [r["question"] for r in load_benchmark("gsm8k", limit=10).rows]
    train = ["an unrelated sentence about nothing in particular at all, really not at all"] * 5
    train[1] = "Rewritten: " + questions[3].upper()
    train[4] = "prefix " + " ".join(questions[7].split()[:9]) + " suffix"
    report = check_contamination(train, ["gsm8k", "gsm8k:solution"], n=8)
    entry = report["benchmarks"]["gsm8k"]
    assert entry["contaminated_train_rows"] == 2 and entry["contaminated_benchmark_rows"] == 2
    assert {(e["train_index"], e["bench_index"]) for e in entry["examples"]} == {(1, 3), (4, 7)}
    assert report["contaminated_train_indices"] == [1, 4]
    assert report["benchmarks"]["gsm8k:solution"]["field"] == "solution"
    with pytest.raises(UserError, match="no field 'nope'"):
        check_contamination(train, ["gsm8k:nope"])


# ---------------------------------------------------------------- a real engine


@pytest.mark.slow
def test_tiny_model_on_addition_with_vllm(tmp_path):
    from rlpost.evaluation.results import write_results
    from rlpost.modeling import build_model, build_tokenizer, save_pretrained
    from rlpost.sft import greedy_completions
    from rlpost.tasks.arithmetic import score_answer

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model_dir = save_pretrained(model, tokenizer, tmp_path / "tiny")
    result = evaluate(model_dir, "addition", limit=20, temperature=0.0, max_tokens=8, seed=0)
    out = write_results(result, tmp_path / "out")

    config = result.config
    assert config["model"] == str(model_dir.resolve()) and config["rows"] == 20
    assert config["decoding"]["greedy"] and config["engine"]["dtype"] == "float32"
    assert config["versions"]["vllm"] and config["versions"]["transformers"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 20 and all(s["finish_reason"] in ("stop", "length") for s in samples)
    rescored = [score_answer(s["completion"], s["gold"]) for s in samples]
    assert [s["score"] for s in samples] == rescored
    assert result.accuracy == sum(rescored) / len(rescored)
    saved = json.loads((out / "results.json").read_text())
    assert saved["figures"]["accuracy"]["value"] == result.accuracy
    assert saved["figures"]["accuracy"]["method"] == "wilson over prompts"
    # vLLM's greedy completions equal transformers' greedy decoding of the same weights.
    prompt_ids = [tokenizer(s["prompt"], add_special_tokens=False)["input_ids"] for s in samples]
    assert [s["completion"] for s in samples] == greedy_completions(model, tokenizer, prompt_ids, 8)


def test_stop_strings_cut_completions_and_run_names_name_outputs(tmp_path):
    from rlpost.commands.eval import _default_output_dir
    from rlpost.evaluation.runner import STOP_STRINGS, _truncate

    assert _truncate("x = 3\n#### 3\n\nQuestion: next one", STOP_STRINGS["gsm8k"]) == "x = 3\n#### 3\n"
    body = "    return a\n\ndef other():\n    pass\n"
    assert _truncate(body, STOP_STRINGS["humaneval"]) == "    return a\n"
    assert _truncate("    if x:\n        y()\n", STOP_STRINGS["humaneval"]) == "    if x:\n        y()\n"
    config = str(_write_run(tmp_path / "runs" / "x")[0].resolve())
    step = tmp_path / "runs" / "x" / "grpo" / "checkpoints" / "step-50" / "policy"
    assert str(_default_output_dir(str(step), "addition", config)) == "evals/x-grpo-step-50-addition"
    assert str(_default_output_dir(str(tmp_path / "runs" / "x" / "grpo" / "policy"), "gsm8k", config)) \
        == "evals/x-grpo-gsm8k"
    assert str(_default_output_dir(str(tmp_path / "m1"), "gsm8k", None)) == "evals/m1-gsm8k"
