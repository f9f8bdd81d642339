"""Schulman's KL estimators (rlpost/learners/kl.py) against hand-computed values, and their exact
expectations under the sampling distribution."""

from __future__ import annotations

import math

import torch

from rlpost.learners.kl import k1, k2, k3


def test_estimators_hand_computed():
    """q = sampler, p = target, per token: token 1 q = p = 0.5 (r = 1); token 2 q = 0.25, p = 0.5 (r = 2);
    token 3 q = 0.5, p = 0.125 (r = 1/4).
    k1 = -ln r: 0, -ln 2 = -0.693147, ln 4 = 1.386294
    k2 = (ln r)^2 / 2: 0, 0.240227, 0.960906
    k3 = r - 1 - ln r: 0, 1 - ln 2 = 0.306853, -0.75 + ln 4 = 0.636294"""
    q = torch.log(torch.tensor([[0.5, 0.25, 0.5]]))
    p = torch.log(torch.tensor([[0.5, 0.5, 0.125]]))
    ln2 = math.log(2.0)
    assert torch.allclose(k1(q, p), torch.tensor([[0.0, -ln2, 2 * ln2]]), atol=1e-6)
    assert torch.allclose(k2(q, p), torch.tensor([[0.0, 0.5 * ln2 ** 2, 2 * ln2 ** 2]]), atol=1e-6)
    assert torch.allclose(k3(q, p), torch.tensor([[0.0, 1 - ln2, -0.75 + 2 * ln2]]), atol=1e-6)
    assert abs(0.5 * ln2 ** 2 - 0.240227) < 1e-6 and abs(-0.75 + 2 * ln2 - 0.636294) < 1e-6


def test_k1_and_k3_are_unbiased_and_k2_is_not():
    """Over a 3-token vocabulary, E_q[k] = sum_y q(y) k(y): KL(q || p) exactly for k1 and k3, not for k2
    (q = [0.7, 0.2, 0.1], p = [0.2, 0.3, 0.5]: KL = 0.7 ln 3.5 + 0.2 ln(2/3) + 0.1 ln 0.2 = 0.63489,
    E_q[k2] = (0.7 ln(3.5)^2 + 0.2 ln(2/3)^2 + 0.1 ln(0.2)^2) / 2 = 0.69525)."""
    q = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    kl = float((q * (q / p).log()).sum())
    assert abs(kl - 0.63489) < 1e-5
    expect = lambda k: float((q * k(q.log(), p.log())).sum())  # noqa: E731
    assert abs(expect(k1) - kl) < 1e-12 and abs(expect(k3) - kl) < 1e-12
    assert abs(expect(k2) - 0.69525) < 1e-5
    assert bool((k2(q.log(), p.log()) >= 0).all()) and bool((k3(q.log(), p.log()) >= 0).all())
    assert bool((k1(q.log(), p.log()) < 0).any())  # k1 is negative on some tokens
