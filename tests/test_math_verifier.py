"""Tests for rewards/math_verifier.py: extraction, math-verify equivalence, GSM8K, TRL reward."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

from rewards.math_verifier import (
    Extraction,
    answers_equivalent,
    extract_answer,
    gsm8k_gold,
    math_accuracy_reward,
    score_math,
)
from rlpost.errors import UserError
from rlpost.evaluation.benchmarks import vendored_path



@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    """The GSM8K test set vendored in the package (its SHA-256 checked against SOURCES.md)."""
    with vendored_path("gsm8k/test.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- GSM8K, whole test set


def test_gsm8k_gold_solutions_score_one(gsm8k_rows):
    """Each row's own solution, used as the completion, must match its own gold answer."""
    assert len(gsm8k_rows) == 1319
    failing = [i for i, row in enumerate(gsm8k_rows) if score_math(row["answer"], row["answer"]) != 1.0]
    assert not failing, f"{len(failing)} rows failed: {failing[:50]}"


def test_gsm8k_neighbour_solutions_score_zero_when_answers_differ(gsm8k_rows):
    """Row i+1's solution scored against row i's gold: 0 where the final numbers differ, else 1."""
    n = len(gsm8k_rows)
    wrong, differing = [], 0
    for i, row in enumerate(gsm8k_rows):
        other = gsm8k_rows[(i + 1) % n]["answer"]
        differ = float(gsm8k_gold(row["answer"])) != float(gsm8k_gold(other))
        differing += differ
        if score_math(other, row["answer"]) != (0.0 if differ else 1.0):
            wrong.append(i)
    assert not wrong, f"{len(wrong)} rows scored wrongly: {wrong[:50]}"
    assert differing > n // 2  # the check above really compared mostly different answers


# ---------------------------------------------------------------- equivalence table

# (prediction, gold, expected). Rows marked "math-verify:" record what the library decides where
# a reader could argue either way; the module docstring repeats them.
EQUIVALENCE_TABLE = [
    # fractions and decimals
    ("0.5", r"\frac{1}{2}", True),
    ("1/2", r"\frac{1}{2}", True),
    (r"\frac12", "0.5", True),
    (r"\dfrac{3}{4}", "0.75", True),
    ("0.75", r"\dfrac{3}{4}", True),
    ("0.7", "3/4", False),
    (r"\frac{2}{4}", r"\frac{1}{2}", True),
    (r"\frac{1}{3}", r"\frac{1}{2}", False),
    ("1/3", "0.333333", True),  # math-verify: floats compared after rounding to 6 places
    ("0.33", "1/3", False),
    ("2.0", "2", True),
    ("10.00", "10", True),
    # radicals
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    (r"\sqrt{8}", r"2\sqrt{2}", True),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True),
    (r"\sqrt{2}", r"\sqrt{3}", False),
    (r"3\sqrt{2}", r"\sqrt{18}", True),
    (r"\frac{\sqrt{3}}{2}", r"\sin(\pi/3)", True),
    # intervals
    ("[1,2)", "[1,2)", True),
    ("[1, 2)", "[1,2)", True),
    ("(1,2)", "[1,2)", False),
    ("[1,2]", "[1,2)", False),
    (r"(-\infty,3]", r"(-\infty, 3]", True),
    (r"(-\infty,3)", r"(-\infty, 3]", False),
    (r"x \in [1,2]", "[1,2]", True),
    (r"[1,2] \cup [3,4]", r"[1,2]\cup[3,4]", True),
    # tuples
    ("(1,2)", "(1,2)", True),
    ("(2,1)", "(1,2)", False),
    ("(1, 2, 3)", "(1,2,3)", True),
    ("(1,2,3)", "(1,3,2)", False),
    ("x = 2, y = 3", "(2, 3)", True),
    # sets (and bare comma lists, which math-verify reads as sets)
    (r"\{3,2,1\}", r"\{1,2,3\}", True),
    (r"\{1,2,3\}", r"\{1,2\}", False),
    ("2, 3", "3, 2", True),
    (r"\{2, 3\}", "2, 3", True),
    # percentages: math-verify lets a gold percentage match both the number and its fraction
    ("0.5", r"50\%", True),
    ("50", r"50\%", True),
    (r"50\%", "50", True),
    ("0.4", r"50\%", False),
    ("50", "0.5", False),
    # units are dropped
    ("5", "5 cm", True),
    ("5", r"5\text{ cm}", True),
    ("5 cm", "5", True),
    (r"5 \text{cm}", "5", True),
    ("6", "5 cm", False),
    (r"12\text{ dollars}", "12", True),
    (r"90^\circ", "90", True),
    # currency and thousands separators
    ("18", r"\$18", True),
    (r"\$18", "18", True),
    ("$18", "18", True),
    (r"\$18.00", "18", True),
    ("1000", "1,000", True),
    ("1,000", "1000", True),
    ("1,000", "100", False),
    # negatives
    ("-3", "-3", True),
    ("3", "-3", False),
    ("-0.5", r"-\frac{1}{2}", True),
    (r"-\infty", r"\infty", False),
    # algebra and constants
    ("1+x", "x+1", True),
    ("(x-1)(x+1)", "x^2-1", True),
    ("x^2+1", "x^2-1", False),
    ("2^{10}", "1024", True),
    ("3.14159265", r"\pi", True),
    ("3.14", r"\pi", False),
    ("3+2i", "2i+3", True),
    (r"\infty", r"\infty", True),
    ("x=2", "2", True),  # math-verify: an assignment's right-hand side counts
    ("2", "x=2", True),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}2\\1\end{pmatrix}", False),
    # plain text and letters
    ("yes", r"\text{yes}", True),
    ("Yes", "yes", True),
    ("sey", "yes", False),  # math-verify alone says True (y*e*s); text is compared as text
    ("no", "yes", False),
    (r"\text{Monday}", "Monday", True),
    ("no solution", r"\text{No Solution}", True),
    ("A", "A", True),
    ("B", "A", False),
    # boxed answers given directly
    (r"\boxed{\frac{1}{2}}", "0.5", True),
]


@pytest.mark.parametrize(("pred", "gold", "expected"), EQUIVALENCE_TABLE)
def test_answers_equivalent_table(pred, gold, expected):
    assert answers_equivalent(pred, gold) is expected


def test_equivalence_table_is_large_and_mixed():
    assert len(EQUIVALENCE_TABLE) >= 60
    assert sum(e for _, _, e in EQUIVALENCE_TABLE) >= 20
    assert sum(not e for _, _, e in EQUIVALENCE_TABLE) >= 20


# Pairs a user would call equal that math-verify 0.9.0 judges unequal. strict xfail: the test
# starts failing (XPASS) once the library handles them, so this list stays true.
MATH_VERIFY_GAPS = [
    (r"\emptyset", r"\varnothing"),  # latex2sympy reads \varnothing as a symbol
    ("1e3", "1000"),  # scientific notation is parsed as 1*e*3
    ("pi", r"\pi"),  # plain "pi" is parsed as p*i
    (r"1 \le x \le 2", "[1,2]"),  # relation vs gold interval needs allow_set_relation_comp
]


@pytest.mark.parametrize(("pred", "gold"), MATH_VERIFY_GAPS)
@pytest.mark.xfail(strict=True, reason="known math-verify gap, documented in the table comment")
def test_known_math_verify_gaps(pred, gold):
    assert answers_equivalent(pred, gold)


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "answer", "method"),
    [
        (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}", "boxed"),
        (r"first \boxed{3}, then \boxed{4}", "4", "boxed"),
        (r"nested \boxed{\frac{\sqrt{2}}{2}} done", r"\frac{\sqrt{2}}{2}", "boxed"),
        (r"\fbox{7} is it", "7", "boxed"),
        (r"\boxed{1,000}", "1000", "boxed"),
        (r"\boxed{(1,2)}", "(1,2)", "boxed"),
        (r"\boxed{\$18.}", "18", "boxed"),
        (r"\boxed{5} and later #### 6", "5", "boxed"),
        ("She pays 3 * 6 = 18\n#### 18", "18", "gsm8k"),
        ("total\n#### 1,450,000", "1450000", "gsm8k"),
        ("#### $42.", "42", "gsm8k"),
        ("#### -3", "-3", "gsm8k"),
        (r"unbalanced \boxed{12 so #### 9", "9", "gsm8k"),
        ("I think 3 apples plus 4 gives 7.", "7", "last_number"),
        ("It costs $1,250.", "1250", "last_number"),
        ("The result is -12.5 degrees", "-12.5", "last_number"),
        ("so the answer is 3/4", "3/4", "last_number"),
        (r"\boxed{} and 8", "8", "last_number"),
        ("no digits here", None, "none"),
        ("", None, "none"),
    ],
)
def test_extract_answer(text, answer, method):
    assert extract_answer(text) == Extraction(answer, method)


def test_extraction_is_frozen():
    with pytest.raises(AttributeError):
        extract_answer("#### 1").answer = "2"  # type: ignore[misc]


def test_gsm8k_gold():
    assert gsm8k_gold("a\nb = <<2*3=6>>6\n#### 6") == "6"
    assert gsm8k_gold("x\n#### 2,125") == "2125"
    with pytest.raises(UserError, match="####"):
        gsm8k_gold("no final line 5")


# ---------------------------------------------------------------- score_math and the reward


def test_score_math():
    assert score_math(r"so the answer is \boxed{\frac{1}{2}}", "0.5") == 1.0
    assert score_math(r"\boxed{0.6}", r"\frac{1}{2}") == 0.0
    assert score_math("It is 18 dollars.", "Janet ... = 18\n#### 18") == 1.0
    assert score_math("nothing to see", "18") == 0.0


def test_math_accuracy_reward_strings_chat_and_missing_gold():
    completions = [
        r"\boxed{2}",
        [{"role": "assistant", "content": "#### 3"}],
        [{"role": "user", "content": "#### 3"}, {"role": "assistant", "content": "4"}],
        "5",
        "6",
    ]
    answers = ["2", "Solution\n#### 3", "3", None, ""]
    rewards = math_accuracy_reward(prompts=["p"] * 5, completions=completions, answer=answers)
    assert rewards == [1.0, 1.0, 0.0, None, None]


def test_math_accuracy_reward_errors():
    with pytest.raises(UserError, match="'answer'"):
        math_accuracy_reward(prompts=["p"], completions=["1"])
    with pytest.raises(UserError, match="1 completions but 2 answers"):
        math_accuracy_reward(prompts=["p"], completions=["1"], answer=["1", "2"])
    with pytest.raises(UserError, match="completion 0"):
        math_accuracy_reward(prompts=["p"], completions=[42], answer=["42"])


def test_math_accuracy_reward_docstring_first_line():
    first = math_accuracy_reward.__doc__.splitlines()[0]
    assert "accuracy" in first and first.endswith(".")


# ---------------------------------------------------------------- off the main thread

CASES = [
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    ("#### 7", "8", 0.0),
]


def test_works_from_worker_threads():
    """math-verify's signal timeouts raise off the main thread unless they are switched off."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: score_math(c[0], c[1]), CASES * 2))
    assert results == [expected for _, _, expected in CASES] * 2


def test_works_from_worker_process():
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        results = list(pool.map(score_math, [c for c, _, _ in CASES], [g for _, g, _ in CASES]))
    assert results == [expected for _, _, expected in CASES]
