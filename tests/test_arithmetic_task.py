"""The addition task: column addition with slips, held-out split, prompt streams, careless demonstrations.

Demonstrations: at each carry the demonstrator drops it with probability p. Before the first slip the
computation is exact, and a dropped carry always changes the written number, so a demonstration of a
pair with c carries is correct with probability (1 - p)^c. Over demonstrations drawn uniformly from the
training pairs, E[fraction correct] = mean over training pairs of (1 - p)^c(a, b).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rlpost.tasks.arithmetic import AdditionTask, Problem, exact_match_reward, score_answer, written_sum


@pytest.fixture(scope="module")
def task() -> AdditionTask:
    return AdditionTask()


@pytest.mark.parametrize(
    "a, b, reverse, slips, expected",
    [
        (57, 68, True, (), "521"),  # 7+8=15 -> 5 c1; 5+6+1=12 -> 2 c1; 1
        (57, 68, False, (), "125"),
        (57, 68, True, (True,), "511"),  # carry out of column 0 dropped: 5+6=11 -> 1 c1; 1
        (57, 68, True, (False, True), "52"),  # carry out of column 1 dropped: no third digit
        (57, 68, True, (True, True), "51"),
        (57, 68, False, (True, True), "15"),
        (99, 1, True, (), "001"),
        (99, 1, False, (), "100"),
        (99, 1, True, (False, True), "00"),
        (12, 30, True, (True, True), "24"),  # no carries: slips change nothing
        (10, 0, True, (), "01"),
        (0, 0, True, (), "0"),
        (0, 0, False, (), "0"),
        (5, 5, True, (True,), "0"),
    ],
)
def test_written_sum_hand_computed(a, b, reverse, slips, expected):
    assert written_sum(a, b, reverse, slips) == expected


def test_written_sum_without_slips_is_the_sum_for_every_pair():
    for a in range(100):
        for b in range(100):
            assert written_sum(a, b, reverse=False) == str(a + b)
            assert written_sum(a, b, reverse=True) == str(a + b)[::-1]


def test_problem_prompt_and_answer():
    assert Problem(57, 68).prompt == "57+68="
    assert Problem(57, 68).answer == "125"  # the default writes the sum as usual
    assert Problem(57, 68, reverse=True).answer == "521"


def test_held_out_and_training_prompts_are_disjoint(task):
    held = {(p.a, p.b) for p in task.held_out(1000, seed=0)}
    assert len(held) == 1000  # distinct
    train = {(p.a, p.b) for seed in range(3) for p in (task.train_problem(seed, i) for i in range(3000))}
    demos = {tuple(map(int, prompt[:-1].split("+"))) for prompt, _ in task.demonstrations(2000, seed=0)}
    assert not held & train
    assert not held & demos
    assert len(train) > 5000  # the stream really covers the training pairs


def test_held_out_share_matches_the_hash_slice(task):
    """A pair is held out when the first SHA-256 byte d satisfies d * 100 // 256 < 15, i.e. d <= 38:
    probability 39/256 = 15.23% per pair; over 10,000 pairs the binomial std is 0.36 points."""
    n_held = len(task._held_out_pairs)
    assert n_held + len(task._train_pairs) == 100 * 100
    p = 39 / 256
    assert abs(n_held / 10_000 - p) < 4 * math.sqrt(p * (1 - p) / 10_000)
    with pytest.raises(ValueError, match=f"only {n_held} held-out pairs"):
        task.held_out(n_held + 1)


def test_train_problem_is_a_pure_function_of_seed_and_index(task):
    again = AdditionTask()
    stream = [task.train_problem(3, i) for i in range(50)]
    assert stream == [again.train_problem(3, i) for i in range(50)]
    assert task.train_problem(3, 17) == stream[17]  # resumable at any index
    assert len(set(stream)) > 40
    assert stream != [task.train_problem(4, i) for i in range(50)]
    assert AdditionTask(reverse=False).train_problem(3, 5).answer == str(stream[5].a + stream[5].b)


def carries(a: int, b: int) -> int:
    """Number of carries in the exact column addition of two numbers below 100."""
    first = (a % 10 + b % 10) >= 10
    second = (a // 10 + b // 10 + first) >= 10
    return int(first) + int(second)


def demo_correct(prompt: str, completion: str) -> bool:
    a, b = map(int, prompt[:-1].split("+"))
    return completion == str(a + b)  # the default task writes sums most-significant digit first


def test_demonstrations_with_no_slips_or_certain_slips_are_exact():
    """p = 0: every demonstration correct. p = 1: correct exactly when the pair needs no carry."""
    for prompt, completion in AdditionTask(carry_slip=0.0).demonstrations(500, seed=1):
        assert demo_correct(prompt, completion)
    for prompt, completion in AdditionTask(carry_slip=1.0).demonstrations(500, seed=1):
        a, b = map(int, prompt[:-1].split("+"))
        assert demo_correct(prompt, completion) == (carries(a, b) == 0), prompt


def test_demonstrations_are_distinct_and_deterministic(task):
    demos = task.demonstrations(300, seed=2)
    assert len({p for p, _ in demos}) == 300
    assert demos == AdditionTask().demonstrations(300, seed=2)


@pytest.mark.parametrize("p", [0.3, 0.6])
def test_careless_demonstrator_error_rate_matches_theory(p):
    task = AdditionTask(carry_slip=p)
    expected = sum((1 - p) ** carries(a, b) for a, b in task._train_pairs) / len(task._train_pairs)
    n = 4000
    observed = sum(demo_correct(*d) for d in task.demonstrations(n, seed=0)) / n
    std = math.sqrt(expected * (1 - expected) / n)  # an upper bound: pairs are drawn without replacement
    assert abs(observed - expected) < 4 * std, (observed, expected, std)


def test_score_answer_and_exact_match_reward():
    assert score_answer(" 521\n", "521") == 1.0
    assert score_answer("52", "521") == 0.0
    rewards = exact_match_reward(["57+68=", "1+1="], ["521", "3"], answer=["521", "2"])
    assert rewards == [1.0, 0.0]
    assert exact_match_reward(["57+68="], ["521"], completion_ids=[[9, 6, 5]]) == [None]
    with pytest.raises(ValueError):
        exact_match_reward(["a", "b"], ["1", "2"], answer=["1"])


def _digest(data) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def test_quickstart_prompts_demonstrations_and_held_out_are_pinned():
    """The quickstart task (max_operand=99, held_out_percent=12, reverse, carry_slip=0.75, seed 0) as it
    was before the long-answer task and the slip fix were added: same prompts, demonstrations, held-out set."""
    task = AdditionTask(99, 12, True, 0.75)
    stream = [(p.prompt, p.answer) for p in (task.train_problem(0, i) for i in range(3000))]
    assert stream[:4] == [("71+68=", "301"), ("43+98=", "321"), ("88+95=", "741"), ("95+78=", "641")]
    assert _digest(stream) == "4bb4e2fbe02867d6"
    demos = task.demonstrations(8000, 0)
    assert [tuple(d) for d in demos[:4]] == [("98+49=", "380"), ("49+10=", "590"), ("39+86=", "150"), ("53+47=", "900")]
    assert _digest(demos) == "c34d2d9c51f21e23"
    held = [(p.prompt, p.answer) for p in task.held_out(1000, 0)]
    assert held[:4] == [("60+56=", "170"), ("50+31=", "810"), ("24+68=", "821"), ("25+23=", "480")]
    assert _digest(held) == "52db8a8dc5222586"
    assert (task.pool_size, len(task._held_out_pairs)) == (8812, 1188)
    default = AdditionTask()
    assert _digest(default.demonstrations(300, 2)) == "042fcac06c17e04a"
    assert _digest([p.prompt for p in default.held_out(100, 1)]) == "b98b12ee143200aa"


def test_quickstart_training_data_is_pinned():
    """What the quickstart's stages read through TrainingData: demonstrations, validation, held-out rows."""
    from rlpost.recipe import load_recipe
    from rlpost.training_data import TrainingData

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    data = TrainingData(load_recipe(recipe).data, 0)
    demos = data.demonstrations(8000)
    validation = data.validation(400, {d["prompt"] for d in demos})
    assert (_digest(demos), _digest(validation), _digest(data.held_out(1000).rows)) == (
        "5407cdbebbdca59c", "ca389072d7791fa9", "93e8ba6296590dda")
    assert data.pool_size() == 8812
