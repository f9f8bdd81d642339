"""Benchmark figures from sample scores, each with a confidence interval over prompts.

Notation: N prompts, n samples per prompt, s_ij the score of sample j of prompt i, and
c_i = #{j : s_ij = 1} the fully correct samples of prompt i.

  accuracy  (1/N) sum_i m_i  with  m_i = (1/n) sum_j s_ij  (= pass@1, the mean of all samples).
            The unit of the interval is the prompt, since samples of one prompt are correlated:
            Wilson on the m_i when they are all 0 or 1 (always so for n = 1 and 0/1 verifiers),
            else the percentile bootstrap of their mean (`metrics.accuracy`).
  pass@k    (1/N) sum_i pass_at_k(n, c_i, k) for k = 1..n (Chen et al.'s unbiased estimator).
  maj@k     (1/N) sum_i maj_at_k(answers_i, correct_i, k) for k = 1..n, when n > 1 and the
            verifier gives vote answers (math, addition).
  IFEval    prompt-level strict/loose: (1/N) sum_i (1/n) sum_j 1[every instruction of ij passes];
            instruction-level strict/loose: R = sum_i a_i / sum_i t_i with a_i the instructions
            passed and t_i the instructions checked over prompt i's samples; its interval is the
            cluster bootstrap of R over prompts (`ratio_interval`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rlpost.evaluation.metrics import Estimate, accuracy, maj_at_k, pass_at_k
from rlpost.evaluation.scoring import SampleScore

_CHUNK = 4_000_000  # resampled indices per chunk (bounds memory to ~32 MB)


def ratio_interval(
    successes: Sequence[float], totals: Sequence[float], confidence: float = 0.95,
    n_resamples: int = 2000, seed: int = 0,
) -> tuple[float, float]:
    """Percentile cluster bootstrap of the ratio R = sum_i a_i / sum_i t_i.

    Draw B = n_resamples sets of N clusters (indices i_1..i_N with replacement), compute
    R_b = sum_k a_{i_k} / sum_k t_{i_k}, and return the alpha/2 and 1 - alpha/2 quantiles of the
    R_b (alpha = 1 - confidence). Every t_i must be > 0. Degenerate ([R, R]) when every cluster
    has the same a_i / t_i, e.g. when all instructions pass. Deterministic for a given seed.
    """
    a = np.asarray(successes, dtype=np.float64)
    t = np.asarray(totals, dtype=np.float64)
    if a.shape != t.shape or a.ndim != 1 or a.size == 0:
        raise ValueError("ratio_interval needs two non-empty 1-D sequences of equal length")
    if np.any(t <= 0):
        raise ValueError("every cluster total must be > 0")
    rng = np.random.default_rng(seed)
    ratios = np.empty(n_resamples, dtype=np.float64)
    rows = max(1, _CHUNK // a.size)
    for start in range(0, n_resamples, rows):
        stop = min(n_resamples, start + rows)
        idx = rng.integers(0, a.size, size=(stop - start, a.size))
        ratios[start:stop] = a[idx].sum(axis=1) / t[idx].sum(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(ratios, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _figure(estimate: Estimate) -> dict[str, Any]:
    method = f"{estimate.method} over prompts"
    return {"value": estimate.value, "low": estimate.low, "high": estimate.high, "n": estimate.n, "method": method}


def _mean_figure(values: list[float], confidence: float, seed: int) -> dict[str, Any]:
    return _figure(accuracy(values, confidence=confidence, seed=seed))


def samples_per_prompt(scores: Sequence[Sequence[SampleScore]]) -> int:
    """n, the number of samples of every prompt (ValueError if they differ or there are none)."""
    counts = {len(s) for s in scores}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every prompt needs the same number (>= 1) of samples; got {sorted(counts)}")
    return counts.pop()


def _pass_and_maj(scores: Sequence[Sequence[SampleScore]], n: int, votable: bool, confidence: float,
                  seed: int) -> dict:
    figures = {}
    correct = [[s.score == 1.0 for s in row] for row in scores]
    for k in range(1, n + 1):
        values = [pass_at_k(n, sum(c), k) for c in correct]
        figures[f"pass@{k}"] = _mean_figure(values, confidence, seed)
    if n > 1 and votable:
        for k in range(1, n + 1):
            values = [maj_at_k([s.answer for s in row], c, k) for row, c in zip(scores, correct)]
            figures[f"maj@{k}"] = _mean_figure(values, confidence, seed)
    return figures


def _ifeval(scores: Sequence[Sequence[SampleScore]], confidence: float, seed: int) -> dict:
    figures = {}
    for kind in ("strict", "loose"):
        flags = [[getattr(s, kind) for s in row] for row in scores]
        prompt_level = [float(np.mean([all(f) for f in row])) for row in flags]
        figures[f"ifeval_prompt_{kind}"] = _mean_figure(prompt_level, confidence, seed)
        passed = [float(sum(sum(f) for f in row)) for row in flags]
        checked = [float(sum(len(f) for f in row)) for row in flags]
        low, high = ratio_interval(passed, checked, confidence, seed=seed)
        figures[f"ifeval_instruction_{kind}"] = {
            "value": sum(passed) / sum(checked), "low": low, "high": high, "n": len(flags),
            "method": "cluster bootstrap over prompts", "instructions": int(sum(checked)),
        }
    return figures


def summarize(scores: Sequence[Sequence[SampleScore]], votable: bool = False, confidence: float = 0.95,
              seed: int = 0) -> dict:
    """All figures for a benchmark's scores (see the module docstring), keyed by name.

    votable: the verifier gives vote answers (`SampleScore.answer`), so maj@k is computed.
    """
    n = samples_per_prompt(scores)
    per_prompt = [float(np.mean([s.score for s in row])) for row in scores]
    figures = {"accuracy": _mean_figure(per_prompt, confidence, seed)}
    figures.update(_pass_and_maj(scores, n, votable, confidence, seed))
    if all(s.strict is not None for row in scores for s in row):
        figures.update(_ifeval(scores, confidence, seed))
    return figures
