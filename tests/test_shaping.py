"""Tests for rewards/shaping.py: format rewards and DAPO's soft overlong penalty."""

from __future__ import annotations

import pytest

from rewards.shaping import (
    format_tags_reward,
    make_format_reward,
    make_overlong_penalty,
    overlong_penalty_reward,
)
from rlpost.errors import UserError

# ---------------------------------------------------------------- format


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>a+b</think><answer>3</answer>", 1.0),
        ("<think>\nstep\n</think>\n<answer>\n3\n</answer>\n", 1.0),
        ("reasoning opened by template</think><answer>3</answer>", 0.0),  # no <think>
        ("<think>x</think>", 0.0),  # no answer
        ("<answer>3</answer><think>x</think>", 0.0),  # wrong order
        ("<think>x</think><answer>3</answer> and more text", 0.0),  # trailing text
        ("<think>x</think><answer>3</answer><answer>4</answer>", 0.0),  # answer twice
        ("<think>x<answer>3</answer></think>", 0.0),  # answer inside think
        ("<think>x</think><answer>3", 0.0),  # unclosed
        ("</think>x<think><answer>3</answer>", 0.0),  # closing before opening
        ("", 0.0),
    ],
)
def test_default_format_tags_reward(text, expected):
    assert format_tags_reward(prompts=["p"], completions=[text]) == [expected]


def test_format_reward_chat_completions_use_last_message():
    good = [{"role": "assistant", "content": "<think>x</think><answer>1</answer>"}]
    bad = good + [{"role": "user", "content": "hi"}]
    assert format_tags_reward(prompts=None, completions=[good, bad]) == [1.0, 0.0]


def test_custom_tags():
    reward = make_format_reward(required_tags=["plan", "code"])
    texts = [
        "<plan>p</plan><code>c</code>",
        "<think>x</think><answer>1</answer>",
        "<code>c</code><plan>p</plan>",
    ]
    assert reward(prompts=None, completions=texts) == [1.0, 0.0, 0.0]


def test_pattern_only():
    reward = make_format_reward(pattern=r"Answer: -?\d+")
    texts = ["Answer: 42", "  Answer: -1\n", "Answer: 42 apples", "answer: 4"]
    assert reward(prompts=None, completions=texts) == [1.0, 1.0, 0.0, 0.0]


def test_pattern_and_tags_both_required():
    pattern = r"<think>.*</think>\s*<answer>\s*\d+\s*</answer>"
    reward = make_format_reward(pattern=pattern, required_tags=["think", "answer"])
    texts = [
        "<think>a</think><answer>12</answer>",  # both pass
        "<think>a</think><answer>twelve</answer>",  # tags pass, pattern fails
        "<think>a</think><think>b</think><answer>12</answer>",  # pattern passes, tags fail (think twice)
    ]
    assert reward(prompts=None, completions=texts) == [1.0, 0.0, 0.0]


def test_format_reward_docstrings():
    assert "<think>...</think><answer>...</answer>" in format_tags_reward.__doc__.splitlines()[0]
    assert format_tags_reward.__name__ == "format_tags_reward"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "(unclosed"}, "not a valid regex"),
        ({"required_tags": []}, "required_tags is empty"),
        ({"required_tags": ["<think>"]}, "not a tag name"),
    ],
)
def test_format_reward_bad_config(kwargs, message):
    with pytest.raises(UserError, match=message):
        make_format_reward(**kwargs)


# ---------------------------------------------------------------- overlong penalty


def _ids(*lengths: int) -> list[list[int]]:
    return [[7] * n for n in lengths]


def test_overlong_penalty_hand_computed():
    """max_length 10, cache 4: R = 0 for L <= 6, (6 - L) / 4 for 6 < L <= 10, -1 beyond."""
    reward = make_overlong_penalty(max_length=10, cache=4)
    got = reward(prompts=None, completions=[""] * 8, completion_ids=_ids(0, 5, 6, 7, 8, 9, 10, 11))
    assert got == [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]


def test_default_overlong_penalty_hand_computed():
    """max 512, cache 128: free up to 384; 385 -> -1/128, 448 -> -64/128, 511 -> -127/128."""
    ids = _ids(1, 384, 385, 448, 511, 512, 600)
    got = overlong_penalty_reward(prompts=None, completions=[""] * 7, completion_ids=ids)
    assert got == [0.0, 0.0, -1 / 128, -0.5, -127 / 128, -1.0, -1.0]
    assert overlong_penalty_reward.__name__ == "overlong_penalty_reward"
    assert "384" in overlong_penalty_reward.__doc__


def test_overlong_penalty_cache_equal_to_max():
    """cache = max_length = 4: R = -L / 4 for L <= 4."""
    reward = make_overlong_penalty(max_length=4, cache=4)
    got = reward(prompts=None, completions=[""] * 4, completion_ids=_ids(0, 1, 4, 5))
    assert got == [0.0, -0.25, -1.0, -1.0]


@pytest.mark.parametrize(
    ("max_length", "cache", "message"),
    [(0, 1, "max_length"), (10, 0, "cache"), (10, 11, "cache"), (10.5, 2, "max_length")],
)
def test_overlong_penalty_bad_config(max_length, cache, message):
    with pytest.raises(UserError, match=message):
        make_overlong_penalty(max_length=max_length, cache=cache)


def test_overlong_penalty_needs_completion_ids():
    with pytest.raises(UserError, match="completion_ids"):
        overlong_penalty_reward(prompts=None, completions=["x"])
