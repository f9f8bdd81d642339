"""Evaluation statistics: confidence intervals, pass@k and maj@k.

Every function here is pure (no I/O, no global state); randomness takes an explicit seed.
Arguments that a user sets (k, confidence) raise `UserError`; arguments that can only be wrong
through a programming error (c > n, successes > n) raise `ValueError`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

from rlpost.errors import UserError

_BOOTSTRAP_CHUNK = 4_000_000  # indices drawn per chunk (bounds memory to ~32 MB)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a confidence interval.

    value: the sample mean; low/high: interval bounds; n: number of samples;
    method: "wilson" or "bootstrap".
    """

    value: float
    low: float
    high: float
    n: int
    method: str

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}] (n={self.n}, {self.method})"


def _z_value(confidence: float) -> float:
    """Two-sided standard-normal quantile z = Phi^-1(1 - (1 - confidence) / 2)."""
    _check_confidence(confidence)
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise UserError(f"confidence must be strictly between 0 and 1, got {confidence}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927; Newcombe 1998, method 3).

    With p = successes / n and z the two-sided normal quantile for `confidence`, the bounds are
    the two roots in p0 of (p - p0)^2 = z^2 p0 (1 - p0) / n, i.e.

        centre    = (p + z^2 / (2n)) / (1 + z^2 / n)
        halfwidth = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        (low, high) = (centre - halfwidth, centre + halfwidth)

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not degenerate at 0/n or n/n
    (0/n gives (0, z^2 / (n + z^2))). Bounds are clipped to [0, 1] against rounding.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval needs n >= 1, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n]; got successes={successes}, n={n}")
    z = _z_value(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def bootstrap_interval(
    values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of `values` (Efron & Tibshirani 1993, ch. 13).

    Draw B = n_resamples resamples of size n with replacement, compute each resample mean
    m_1..m_B, and return the empirical alpha/2 and 1 - alpha/2 quantiles of the m_b
    (alpha = 1 - confidence; numpy's linear-interpolation quantile). Deterministic for a
    given seed (numpy PCG64 via `default_rng(seed)`).
    """
    _check_confidence(confidence)
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError("bootstrap_interval needs a non-empty 1-D sequence of numbers")
    if n_resamples < 1:
        raise UserError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    rows_per_chunk = max(1, _BOOTSTRAP_CHUNK // data.size)
    for start in range(0, n_resamples, rows_per_chunk):
        stop = min(n_resamples, start + rows_per_chunk)
        idx = rng.integers(0, data.size, size=(stop - start, data.size))
        means[start:stop] = data[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator of Chen et al. 2021 (Codex paper, eq. 1).

    From n samples of which c are correct, the probability that at least one of k samples
    drawn without replacement is correct:

        pass@k = 1 - C(n - c, k) / C(n, k)
               = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)        (if n - c >= k)
               = 1                                              (if n - c <  k)

    The product form avoids the huge binomial coefficients of the first line.
    """
    if n < 1:
        raise ValueError(f"pass_at_k needs n >= 1 samples, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n]; got c={c}, n={n}")
    if not 1 <= k <= n:
        raise UserError(f"pass@k needs 1 <= k <= n (samples per prompt); got k={k}, n={n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """Majority-vote accuracy over the first k samples of one prompt (maj@k, Wang et al. 2022).

    answers[i] is the normalised final answer extracted from sample i (None if none could be
    extracted); correct[i] says whether sample i was judged correct. Among the first k samples,
    None answers cast no vote; the answer with the most votes wins, and a tie goes to the tied
    answer that occurs first. Returns 1.0 if the sample where the winning answer first occurs is
    correct, else 0.0 (also 0.0 when no sample among the first k has an answer). Samples with
    equal answers are assumed to be judged alike, so answers must be normalised by the caller.
    """
    if len(answers) != len(correct):
        raise ValueError(f"answers ({len(answers)}) and correct ({len(correct)}) differ in length")
    if not 1 <= k <= len(answers):
        raise UserError(f"maj@k needs 1 <= k <= samples per prompt; got k={k}, n={len(answers)}")
    votes = Counter(a for a in answers[:k] if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    first_winner = next(i for i, a in enumerate(answers[:k]) if a is not None and votes[a] == top)
    return 1.0 if correct[first_winner] else 0.0


def accuracy(
    scores: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> Estimate:
    """Mean score with a confidence interval.

    If every score is 0 or 1 the mean is a binomial proportion and the interval is Wilson's
    (`wilson_interval`); otherwise (partial credit, pass@k averages) it is the percentile
    bootstrap of the mean (`bootstrap_interval`).
    """
    if len(scores) == 0:
        raise ValueError("accuracy needs at least one score")
    if any(s is None for s in scores):
        raise ValueError("scores contain None; drop not-applicable samples before accuracy()")
    values = [float(s) for s in scores]
    mean = math.fsum(values) / len(values)
    if all(v in (0.0, 1.0) for v in values):
        low, high = wilson_interval(int(sum(values)), len(values), confidence)
        return Estimate(mean, low, high, len(values), "wilson")
    low, high = bootstrap_interval(values, confidence, n_resamples, seed)
    return Estimate(mean, low, high, len(values), "bootstrap")


def intervals_overlap(a: Estimate, b: Estimate) -> bool:
    """True if the closed intervals [a.low, a.high] and [b.low, b.high] share a point.

    Non-overlapping 95% intervals imply a significant difference; overlapping ones do not
    imply the converse (the test is conservative).
    """
    return a.low <= b.high and b.low <= a.high
