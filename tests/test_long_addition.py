"""The long-answer addition task (`LongAdditionTask`, recipe keys data.task.digits / data.task.carries).

Each column k of a problem carries out with probability q = carries / digits (a_k + b_k >= 10), else
a_k + b_k <= 8, so carries never cascade: the carry count is Binomial(digits, q), and a dropped carry out
of column k changes exactly answer digit k + 1 (reversed layout), which is how the tests see slips.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlpost.errors import UserError
from rlpost.recipe import load_recipe
from rlpost.tasks.arithmetic import (LongAdditionTask, _is_held_out, addition_task, exact_match_reward,
                                     score_answer)
from rlpost.training_data import TrainingData

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LONG_RECIPE = RECIPES / "long_addition.yaml"


@pytest.fixture(scope="module")
def task() -> LongAdditionTask:
    return LongAdditionTask(digits=127, carries=1.0, held_out_percent=12, reverse=True, carry_slip=0.75)


def operand_digits(prompt: str, digits: int) -> tuple[str, str]:
    """The two operands of a reversed prompt, least significant digit first."""
    a, b = prompt[:-1].split("+")
    assert len(a) == len(b) == digits
    return a, b


def carry_columns(prompt: str, digits: int) -> list[int]:
    a, b = operand_digits(prompt, digits)
    return [k for k in range(digits) if int(a[k]) + int(b[k]) >= 10]


def test_layout_lengths_and_exact_answer(task):
    for i in range(50):
        p = task.train_problem(0, i)
        assert len(p.prompt) == 2 * 127 + 2 and p.prompt.endswith("=")
        assert len(p.answer) == 127 + 1
        assert p.answer == str(p.a + p.b).zfill(128)[::-1]
        assert task.answer_for(p.prompt) == p.answer
    natural = LongAdditionTask(digits=30, carries=3.0, reverse=False).train_problem(1, 2)
    assert natural.answer == str(natural.a + natural.b) and natural.prompt == f"{natural.a}+{natural.b}="


def test_column_sums_never_equal_nine_so_carries_never_cascade(task):
    for i in range(200):
        a, b = operand_digits(task.train_problem(2, i).prompt, 127)
        assert all(int(x) + int(y) != 9 for x, y in zip(a, b))


def test_problems_are_a_pure_function_of_seed_and_index(task):
    again = LongAdditionTask(digits=127, carries=1.0, held_out_percent=12, reverse=True, carry_slip=0.75)
    stream = [task.train_problem(3, i) for i in range(40)]
    assert stream == [again.train_problem(3, i) for i in range(40)]
    assert task.train_problem(3, 17) == stream[17]  # resumable at any index
    assert len({p.prompt for p in stream}) == 40
    assert stream != [task.train_problem(4, i) for i in range(40)]
    assert task.held_out(30, seed=1) == again.held_out(30, seed=1)
    assert task.held_out(10, seed=1) == task.held_out(30, seed=1)[:10]  # a prefix: --limit takes the first L
    assert task.held_out(10, seed=1) != task.held_out(10, seed=2)
    assert task.demonstrations(20, seed=5) == again.demonstrations(20, seed=5)


def test_held_out_is_distinct_and_disjoint_from_training_and_demonstrations(task):
    held = task.held_out(300, seed=0)
    pairs = {(p.a, p.b) for p in held}
    assert len(pairs) == 300
    assert all(_is_held_out(a, b, 12) for a, b in pairs)
    train = [task.train_problem(seed, i) for seed in (0, 1) for i in range(1500)]
    demos = task.demonstrations(2000, seed=0)
    assert len({p for p, _ in demos}) == 2000
    train_pairs = {(p.a, p.b) for p in train}
    demo_pairs = {tuple(int(n[::-1]) for n in prompt[:-1].split("+")) for prompt, _ in demos}
    assert not any(_is_held_out(a, b, 12) for a, b in train_pairs | demo_pairs)
    assert not pairs & (train_pairs | demo_pairs)


@pytest.mark.parametrize("digits, carries", [(127, 1.0), (20, 5.0)])
def test_carry_count_is_binomial_with_mean_carries(digits, carries):
    """Mean of Binomial(digits, q) over n problems: std sqrt(digits q (1 - q) / n). A layout with uniform
    digits would average ~0.45 carries per column, far outside; so would ignoring `carries`."""
    task = LongAdditionTask(digits=digits, carries=carries, held_out_percent=12)
    n, q = 2000, carries / digits
    counts = [len(carry_columns(task.train_problem(0, i).prompt, digits)) for i in range(n)]
    mean = sum(counts) / n
    assert abs(mean - carries) < 4 * math.sqrt(digits * q * (1 - q) / n), mean
    p0 = (1 - q) ** digits  # 0.366 at digits=127, carries=1: the problems SFT gets right
    zero = counts.count(0) / n
    assert abs(zero - p0) < 4 * math.sqrt(p0 * (1 - p0) / n) + 1e-3, (zero, p0)


def test_demonstrator_drops_carries_at_the_slip_rate_on_every_column():
    """A slip at carry column k changes answer digit k + 1 and nothing else; counted on columns k > 4
    (never reached when slips are drawn for 4 columns only) and on the last column alone."""
    digits, p = 40, 0.3
    task = LongAdditionTask(digits=digits, carries=20.0, held_out_percent=12, carry_slip=p)
    late = late_slips = last = last_slips = 0
    for prompt, completion in task.demonstrations(400, seed=0):
        answer = task.answer_for(prompt)
        assert len(completion) == digits + 1
        carried = set(carry_columns(prompt, digits))
        for k in range(digits):
            slipped = completion[k + 1] != answer[k + 1]
            assert not slipped or k in carried, (prompt, k)  # only a carry can be dropped
            if k in carried and k > 4:
                late, late_slips = late + 1, late_slips + slipped
            if k in carried and k == digits - 1:
                last, last_slips = last + 1, last_slips + slipped
        assert completion[0] == answer[0]  # column 0 has no carry in
    assert late > 5000
    assert abs(late_slips / late - p) < 4 * math.sqrt(p * (1 - p) / late), late_slips / late
    assert abs(last_slips / last - p) < 4 * math.sqrt(p * (1 - p) / last) + 0.01, last_slips / last
    exact = LongAdditionTask(digits=digits, carries=20.0, carry_slip=0.0)
    assert all(c == exact.answer_for(q) for q, c in exact.demonstrations(100, seed=1))


def test_exact_reward_on_long_answers(task):
    p = task.held_out(1, seed=0)[0]
    off = p.answer[:60] + str((int(p.answer[60]) + 1) % 10) + p.answer[61:]
    assert score_answer(p.answer + "\n", p.answer) == 1.0
    assert score_answer(off, p.answer) == 0.0
    assert exact_match_reward([p.prompt] * 3, [p.answer, off, p.answer[:-1]], answer=[p.answer] * 3) == [1.0, 0.0, 0.0]


def test_task_arguments_are_checked():
    with pytest.raises(ValueError, match="digits"):
        LongAdditionTask(digits=0)
    with pytest.raises(ValueError, match="carries"):
        LongAdditionTask(digits=10, carries=11.0)
    assert type(addition_task(digits=None)).__name__ == "AdditionTask"
    assert type(addition_task(digits=3, carries=3.0)).__name__ == "LongAdditionTask"
    assert LongAdditionTask(digits=3, carries=3.0).pool_size < 45 ** 3  # every column carries: 45 pairs each


def test_recipe_loads_and_plumbs_the_long_task():
    recipe = load_recipe(LONG_RECIPE)
    t = recipe.data.task
    assert (t.digits, t.carries, t.carry_slip, t.held_out_percent, t.reverse) == (127, 1.0, 0.75, 12, True)
    assert recipe.model.build.max_positions >= 2 * 127 + 2 + 128 + 1
    assert recipe.sft.max_tokens >= 129 and recipe.grpo.max_completion_length >= 129
    assert recipe.eval[0].benchmark == "held_out" and recipe.eval[0].max_tokens >= 129
    data = TrainingData(recipe.data, recipe.seed)
    assert isinstance(data.task(), LongAdditionTask)
    assert data.pool_size() > 10 ** 100  # estimated, never enumerated
    prompt, columns = data.prompts().get(7)
    assert len(prompt) == 256 and columns["answer"] == data.task().answer_for(prompt)
    demos = data.demonstrations(30)
    assert all(len(d["prompt"]) == 256 and len(d["completion"]) == 128 for d in demos)
    validation = data.validation(20, {d["prompt"] for d in demos})
    assert len(validation) == 20 and not {v["prompt"] for v in validation} & {d["prompt"] for d in demos}
    rows = data.held_out(recipe.eval[0].limit).rows
    assert len(rows) == recipe.eval[0].limit and len(rows[0]["prompt"]) == 256
    assert rows[0]["answer"] == rows[0]["reference"] == data.task().answer_for(rows[0]["prompt"])


@pytest.mark.parametrize("overrides, key", [
    (["data.task.digits=0"], "data.task.digits"),
    (["data.task.digits=ten"], "data.task.digits"),
    (["data.task.carries=0"], "data.task.carries"),
    (["data.task.carries=128"], "data.task.carries"),
    (["data.task.carries=many"], "data.task.carries"),
    (["model.build.max_positions=256"], "model.build.max_positions"),
    (["eval=[{benchmark: held_out, limit: 10}]"], "eval[0].max_tokens"),
    (["sft.max_tokens=6"], "sft.max_tokens"),
    (["sft.max_tokens=128"], "sft.max_tokens"),  # 128 digits but no room for the EOS
    (["grpo.max_completion_length=64"], "grpo.max_completion_length"),
])
def test_bad_long_task_keys_are_named(overrides, key):
    with pytest.raises(UserError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(LONG_RECIPE, overrides)


def test_quickstart_recipe_is_untouched_by_the_long_task_keys():
    recipe = load_recipe(RECIPES / "quickstart.yaml")
    assert recipe.data.task.digits is None
    with pytest.raises(UserError, match="model.build.max_positions"):  # 30 digits: 62 + 31 + EOS > 64
        load_recipe(RECIPES / "quickstart.yaml", ["data.task.digits=30", "data.task.carries=1"])
    with pytest.raises(UserError, match=r"eval\[0\].max_tokens"):  # 10 digits fit, the default 8 tokens do not
        load_recipe(RECIPES / "quickstart.yaml", ["data.task.digits=10", "data.task.carries=1"])


def test_load_addition_and_run_settings_take_the_long_task(tmp_path):
    from rlpost.evaluation.addition import load_addition, task_options

    bench = load_addition(held_out_percent=12, reverse=True, count=5, seed=0, digits=127, carries=1.0)
    held = LongAdditionTask(127, 1.0, 12, True).held_out(5, 0)
    assert [r["prompt"] for r in bench.rows] == [p.prompt for p in held]
    with pytest.raises(UserError, match="digits"):
        load_addition(digits=0)
    run = {"data.source": "task", "seed": 0, "data.task.max_operand": 99, "data.task.held_out_percent": 12,
           "data.task.reverse": True, "data.task.carry_slip": 0.75, "data.task.digits": 127,
           "data.task.carries": 1.0, "eval": [{"benchmark": "held_out", "limit": 200}],
           "grpo.max_completion_length": 130}
    (tmp_path / "recipe.json").write_text(json.dumps(run))
    options, budget = task_options(tmp_path / "recipe.json")
    assert options["digits"] == 127 and options["carries"] == 1.0 and options["count"] == 200 and budget == 130
    for key in ("data.task.digits", "data.task.carries"):  # a run from before these keys
        run.pop(key)
    (tmp_path / "recipe.json").write_text(json.dumps(run))
    assert "digits" not in task_options(tmp_path / "recipe.json")[0]


def test_a_run_from_before_the_long_task_keys_still_resumes(tmp_path):
    """recipe.json written before data.task.digits / carries existed: at their defaults they change nothing."""
    from rlpost import pipeline

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe = load_recipe(RECIPES / "quickstart.yaml", [f"run_dir={run_dir}"])
    pipeline._check_same_recipe(run_dir, recipe)
    old = json.loads((run_dir / "recipe.json").read_text())
    assert old.pop("data.task.digits") is None and old.pop("data.task.carries") == 1.0
    (run_dir / "recipe.json").write_text(json.dumps(old))
    pipeline._check_same_recipe(run_dir, recipe)  # accepted
    with pytest.raises(UserError, match="data.task.carries"):  # off its default: a changed recipe
        pipeline._check_same_recipe(run_dir, load_recipe(RECIPES / "quickstart.yaml", [
            f"run_dir={run_dir}", "data.task.carries=2.0"]))
