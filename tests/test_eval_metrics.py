"""Evaluation statistics against published values and exact combinatorics."""

import math
from fractions import Fraction

import numpy as np
import pytest

from rlpost.errors import UserError
from rlpost.evaluation import metrics
from rlpost.evaluation.metrics import (
    Estimate,
    accuracy,
    bootstrap_interval,
    intervals_overlap,
    maj_at_k,
    pass_at_k,
    wilson_interval,
)

# Two-sided normal quantiles from standard tables (not computed by the code under test).
Z = {0.90: 1.6448536269514722, 0.95: 1.959963984540054, 0.99: 2.5758293035489004}


def quadratic_roots(successes, n, z):
    """Wilson bounds re-derived: roots in p of (1 + z^2/n) p^2 - (2 ph + z^2/n) p + ph^2 = 0."""
    ph = successes / n
    a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


@pytest.mark.parametrize(
    "successes,n,low,high",
    # Newcombe (1998), Statistics in Medicine 17:857-872, Table II, method 3 (Wilson score).
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_newcombe_1998(successes, n, low, high):
    got = wilson_interval(successes, n)
    assert got == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("successes,n", [(0, 10), (10, 10), (5, 10), (81, 263), (3, 7), (999, 1000)])
@pytest.mark.parametrize("confidence", [0.90, 0.95, 0.99])
def test_wilson_equals_roots_of_score_quadratic(successes, n, confidence):
    got = wilson_interval(successes, n, confidence)
    assert got == pytest.approx(quadratic_roots(successes, n, Z[confidence]), abs=1e-12)


def test_wilson_closed_forms_at_the_edges():
    z2 = Z[0.95] ** 2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-12)
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0), abs=1e-12)
    low, high = wilson_interval(5, 10)
    assert low + high == pytest.approx(1.0, abs=1e-12)  # symmetric around 1/2


def test_wilson_rejects_bad_input():
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(UserError, match="confidence"):
        wilson_interval(1, 10, confidence=1.0)


def test_bootstrap_two_point_distribution():
    # Resample means of [0, 2] are 0, 1, 2 with probabilities 1/4, 1/2, 1/4, so the 30% and
    # 70% quantiles (confidence 0.4) are both 1.
    assert bootstrap_interval([0.0, 2.0], confidence=0.4, n_resamples=4000) == (1.0, 1.0)


def test_bootstrap_constant_and_determinism():
    assert bootstrap_interval([0.3] * 17) == pytest.approx((0.3, 0.3))
    values = np.random.default_rng(1).random(50)
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    assert bootstrap_interval(values, seed=3) != bootstrap_interval(values, seed=4)


def test_bootstrap_agrees_with_normal_approximation():
    values = np.arange(100.0)  # mean 49.5, population sd sqrt((100^2 - 1) / 12)
    se = math.sqrt((100**2 - 1) / 12) / math.sqrt(100)
    low, high = bootstrap_interval(values, n_resamples=4000)
    assert low == pytest.approx(49.5 - Z[0.95] * se, abs=0.6)
    assert high == pytest.approx(49.5 + Z[0.95] * se, abs=0.6)


def test_bootstrap_chunking_does_not_change_the_draws(monkeypatch):
    values = np.random.default_rng(2).random(30)
    whole = bootstrap_interval(values, n_resamples=500)
    monkeypatch.setattr(metrics, "_BOOTSTRAP_CHUNK", 7 * 30)
    assert bootstrap_interval(values, n_resamples=500) == whole


@pytest.mark.parametrize("n,c", [(1, 0), (1, 1), (5, 0), (5, 2), (10, 3), (20, 19), (50, 7), (200, 13)])
def test_pass_at_k_equals_exact_combinatorial_form(n, c):
    for k in range(1, n + 1):
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


def test_pass_at_k_hand_values():
    assert pass_at_k(2, 1, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    assert pass_at_k(5, 4, 2) == 1.0  # only one wrong sample: any pair has a correct one
    with pytest.raises(UserError, match="k"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_maj_at_k_votes_ties_and_none():
    answers = ["3", "5", "5", None, "3", "3"]
    correct = [True, False, False, False, True, True]
    assert maj_at_k(answers, correct, 3) == 0.0  # "5" wins 2-1
    assert maj_at_k(answers, correct, 6) == 1.0  # "3" wins 3-2, None does not vote
    assert maj_at_k(["7", "8"], [False, True], 2) == 0.0  # tie: first occurrence wins
    assert maj_at_k(["8", "7"], [True, False], 2) == 1.0
    assert maj_at_k([None, None, "1"], [False, False, True], 2) == 0.0  # no votes among first 2
    assert maj_at_k([None, None, "1"], [False, False, True], 3) == 1.0
    with pytest.raises(UserError):
        maj_at_k(["1"], [True], 2)


def test_accuracy_picks_wilson_for_binary_scores():
    est = accuracy([1, 0, 1, 1, 0, True, 0.0, 1.0])
    assert est.method == "wilson" and est.n == 8
    assert est.value == pytest.approx(5 / 8)
    assert (est.low, est.high) == pytest.approx(quadratic_roots(5, 8, Z[0.95]), abs=1e-12)


def test_accuracy_bootstrap_for_partial_credit():
    scores = [0.5, 1.0, 0.25, 0.0, 0.75]
    est = accuracy(scores)
    assert est.method == "bootstrap"
    assert est.value == pytest.approx(0.5)
    assert (est.low, est.high) == bootstrap_interval(scores)
    assert est.low <= est.value <= est.high
    with pytest.raises(ValueError):
        accuracy([])
    with pytest.raises(ValueError, match="None"):
        accuracy([1.0, None])


def test_intervals_overlap():
    a = Estimate(0.5, 0.4, 0.6, 100, "wilson")
    assert intervals_overlap(a, Estimate(0.7, 0.6, 0.8, 100, "wilson"))  # touching
    assert not intervals_overlap(a, Estimate(0.75, 0.61, 0.9, 100, "wilson"))
    assert not intervals_overlap(Estimate(0.75, 0.61, 0.9, 100, "wilson"), a)
    assert intervals_overlap(a, Estimate(0.5, 0.45, 0.55, 100, "wilson"))  # nested
    assert "n=100" in str(a)
