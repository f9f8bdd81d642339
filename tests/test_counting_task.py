"""The counting task (`rlpost.tasks.counting`, recipe keys data.task.kind / digits / numbers).

`"n:"` -> the next `numbers` numbers, each `digits` digits, least significant first, comma-separated.
A carry out of the last digit happens when a count passes a multiple of 10, so a count of k steps
from a start whose last digit is d needs one iff d + k >= 10.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlpost.errors import UserError
from rlpost.recipe import load_recipe
from rlpost.tasks import build_task
from rlpost.tasks.counting import CountingTask, CountProblem
from rlpost.training_data import TrainingData

COUNTING_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "counting.yaml"


@pytest.fixture(scope="module")
def task() -> CountingTask:
    return CountingTask(width=21, numbers=6, held_out_percent=12, carry_slip=0.75)


def test_hand_computed_answers_and_demonstrator():
    p = CountProblem(start=479, width=4, numbers=2)  # 0479 -> 0480, 0481, least significant first
    assert (p.prompt, p.answer) == ("9740:", "0840,1840")
    # a demonstrator that forgets every carry: 479 + 1 -> 470 (the 1 out of column 0 dropped), then 471
    assert p.written([(True,) * 4, (True,) * 4]) == "0740,1740"
    # forgetting only the carry out of column 1: 0499 -> 0400 (column 0 carried, column 1 dropped), 0401
    assert CountProblem(499, 4, 2).written([(False, True, False, False)] * 2) == "0040,1040"
    assert CountProblem(499, 4, 2).answer == "0050,1050"
    assert CountProblem(499, 4, 2).written([(False,) * 4] * 2) == CountProblem(499, 4, 2).answer


def test_layout_lengths_and_answer_for(task):
    for i in range(50):
        p = task.train_problem(0, i)
        assert len(p.prompt) == task.prompt_length == 22 and p.prompt.endswith(":")
        assert len(p.answer) == task.answer_length == 6 * 22 - 1
        numbers = [int(n[::-1]) for n in p.answer.split(",")]
        assert numbers == [p.start + k for k in range(1, 7)]
        assert task.answer_for(p.prompt) == p.answer


def test_problems_are_a_pure_function_of_seed_and_index(task):
    assert [task.train_problem(3, i) for i in range(20)] == [task.train_problem(3, i) for i in range(20)]
    assert task.train_problem(3, 0) != task.train_problem(4, 0)


def test_held_out_is_distinct_and_disjoint_from_training_and_demonstrations(task):
    held = task.held_out(300, seed=0)
    prompts = {p.prompt for p in held}
    assert len(prompts) == 300 and [p.prompt for p in task.held_out(40, seed=0)] == [p.prompt for p in held[:40]]
    train = {task.train_problem(0, i).prompt for i in range(2000)}
    demos = {prompt for prompt, _ in task.demonstrations(500, seed=0)}
    assert not prompts & train and not prompts & demos and len(demos) == 500


def test_demonstrator_drops_carries_at_the_slip_rate():
    """Each demonstration is the count except where a carry was dropped; at the first number that
    needs a carry out of column 0 the demonstrator writes it with probability 1 - carry_slip."""
    task = CountingTask(width=6, numbers=6, carry_slip=0.75)
    carried = needed = 0
    for prompt, completion in task.demonstrations(4000, seed=1):
        start = int(prompt[:-1][::-1])
        written = [int(n[::-1]) for n in completion.split(",")]
        assert written[0] == start + 1 or (written[0] < start + 1 and (start + 1 - written[0]) % 10 == 0)
        k = 10 - start % 10  # the step whose count passes a multiple of ten
        if k > 6:
            assert completion == task.answer_for(prompt)  # no carry needed: the demonstrator is right
        elif start // 10 % 10 != 9:  # one carry, out of column 0 (no cascade into column 2)
            needed += 1
            carried += written[k - 1] == start + k
    assert needed > 1800 and abs(carried / needed - 0.25) < 0.03
    exact = CountingTask(width=6, numbers=6, carry_slip=0.0)
    assert all(c == exact.answer_for(p) for p, c in exact.demonstrations(200, seed=1))


def test_share_of_problems_without_a_carry_is_what_the_sft_policy_can_get_right(task):
    held = task.held_out(2000, seed=0)
    no_carry = sum(p.start % 10 + 6 <= 9 for p in held) / len(held)
    assert abs(no_carry - 0.4) < 0.04  # last digit 0-3: the ~40% the careless policy gets right


def test_task_arguments_are_checked():
    with pytest.raises(ValueError, match="width"):
        CountingTask(width=0)
    with pytest.raises(ValueError, match="numbers"):
        CountingTask(width=1, numbers=10)
    with pytest.raises(ValueError, match="digits"):
        build_task("counting", digits=None)
    with pytest.raises(ValueError, match="kind"):
        build_task("subtraction", digits=3)
    assert isinstance(build_task("counting", digits=3, numbers=2), CountingTask)


def test_recipe_loads_and_plumbs_the_counting_task():
    recipe = load_recipe(COUNTING_RECIPE)
    t = recipe.data.task
    assert (t.kind, t.digits, t.numbers, t.carry_slip) == ("counting", 21, 6, 0.75)
    data = TrainingData(recipe.data, recipe.seed)
    assert isinstance(data.task(), CountingTask)
    prompt, columns = data.prompts().get(3)
    assert len(prompt) == 22 and columns["answer"] == data.task().answer_for(prompt)
    demos = data.demonstrations(20)
    assert all(len(d["completion"]) == 131 and d["answer"] == data.task().answer_for(d["prompt"]) for d in demos)
    rows = data.held_out(recipe.eval[0].limit).rows
    assert len(rows) == recipe.eval[0].limit and rows[0]["answer"] == rows[0]["reference"]
    assert rows[0]["prompt"] == CountProblem(rows[0]["start"], 21, 6).prompt


@pytest.mark.parametrize("overrides, key", [
    (["data.task.kind=subtraction"], "data.task.kind"),
    (["data.task.digits=null"], "data.task.digits"),
    (["data.task.numbers=0"], "data.task.numbers"),
    (["data.task.reverse=false"], "data.task.reverse"),
    (["model.build.max_positions=128"], "model.build.max_positions"),
    (["eval=[{benchmark: held_out, limit: 10}]"], "eval[0].max_tokens"),
    (["grpo.max_completion_length=131"], "grpo.max_completion_length"),  # the answer, no room for the EOS
])
def test_bad_counting_keys_are_named(overrides, key):
    with pytest.raises(UserError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(COUNTING_RECIPE, overrides)


def test_run_settings_carry_the_counting_task_to_rlpost_eval(tmp_path):
    from rlpost.evaluation.addition import load_addition, task_options

    run = {"data.source": "task", "seed": 0, "data.task.max_operand": 99, "data.task.held_out_percent": 12,
           "data.task.reverse": True, "data.task.carry_slip": 0.75, "data.task.digits": 21,
           "data.task.carries": 1.0, "data.task.kind": "counting", "data.task.numbers": 6,
           "eval": [{"benchmark": "held_out", "limit": 50}], "grpo.max_completion_length": 136}
    (tmp_path / "recipe.json").write_text(json.dumps(run))
    options, budget = task_options(tmp_path / "recipe.json")
    assert options["kind"] == "counting" and options["numbers"] == 6 and budget == 136
    bench = load_addition(**options)
    assert [r["prompt"] for r in bench.rows] == [p.prompt for p in CountingTask(21, 6, 12).held_out(50, 0)]


INSTRUCTED_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "counting_instructed.yaml"


def test_instructed_recipe_puts_its_instruction_before_every_prompt_on_every_path(tmp_path):
    """Rollouts, SFT and the held-out evaluation format prompts with data.prompt; bench/vs_trl.py gives
    TRL the same text; `rlpost eval` on the run's recipe.json keeps it."""
    from bench.vs_trl import trl_rows
    from rlpost.evaluation.addition import run_prompt_format
    from rlpost.modeling import build_tokenizer
    from rlpost.recipe import flat_settings

    recipe, tokenizer = load_recipe(INSTRUCTED_RECIPE), build_tokenizer()
    fmt = recipe.data.prompt
    instruction = fmt.template.replace("{prompt}", "")
    assert len(instruction) == 197
    data = TrainingData(recipe.data, recipe.seed)
    prompt, columns = data.prompts().get(0)
    ids = fmt.token_ids(tokenizer, {**columns, "prompt": prompt})
    assert len(ids) == 197 + 22 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == instruction + prompt
    row = trl_rows(recipe, tokenizer, 3)[0]
    assert row == {"answer": columns["answer"], "prompt": instruction + prompt}
    (tmp_path / "recipe.json").write_text(json.dumps(flat_settings(recipe)))
    assert run_prompt_format(tmp_path / "recipe.json") == fmt
    (tmp_path / "recipe.json").write_text(json.dumps(flat_settings(load_recipe(COUNTING_RECIPE))))
    assert run_prompt_format(tmp_path / "recipe.json") is None


@pytest.mark.parametrize("overrides, key", [
    (["model.build.max_positions=256"], "model.build.max_positions"),  # 197 + 22 + 131 + EOS = 351 positions
    (['data.prompt.template="Count: {prompt}"'], "data.prompt.template"),  # no capitals in the built tokenizer
])
def test_instructed_recipe_budget_counts_the_template_and_its_alphabet_is_checked(overrides, key):
    load_recipe(INSTRUCTED_RECIPE, ["model.build.max_positions=351"])  # exactly enough
    with pytest.raises(UserError, match=key):
        load_recipe(INSTRUCTED_RECIPE, overrides)
