"""rlpost.learners.gae against values worked out by hand, and against the definitions term by term.

The hand case: one completion of 3 tokens, rewards r = [0, 0, 1] (the outcome on the last token),
values V = [0.5, 0.6, 0.7], V_3 = 0 (the episode ends after the last token).

gamma = lam = 1:
    delta = [0 + 0.6 - 0.5, 0 + 0.7 - 0.6, 1 + 0 - 0.7] = [0.1, 0.1, 0.3]
    A     = [0.1 + 0.1 + 0.3, 0.1 + 0.3, 0.3]     = [0.5, 0.4, 0.3]   (= 1 - V: return minus baseline)
    R     = A + V                                  = [1.0, 1.0, 1.0]

gamma = 0.9, lam = 0.95 (gamma * lam = 0.855):
    delta_2 = 1 + 0.9 * 0   - 0.7 = 0.3
    delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03
    delta_0 = 0 + 0.9 * 0.6 - 0.5 = 0.04
    A_2 = 0.3
    A_1 = 0.03 + 0.855 * 0.3    = 0.2865
    A_0 = 0.04 + 0.855 * 0.2865 = 0.2849575
    R   = [0.7849575, 0.8865, 1.0]
"""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.learners.gae import gae, token_rewards, whiten

R3 = torch.tensor([[0.0, 0.0, 1.0]])
V3 = torch.tensor([[0.5, 0.6, 0.7]])
M3 = torch.ones(1, 3)


def close(a: torch.Tensor, b) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=torch.float32), atol=1e-6)


def test_gamma_1_lambda_1_is_return_minus_value():
    advantages, returns = gae(R3, V3, M3, gamma=1.0, lam=1.0)
    assert close(advantages, [[0.5, 0.4, 0.3]])
    assert close(returns, [[1.0, 1.0, 1.0]])


def test_gamma_0_9_lambda_0_95_by_hand():
    advantages, returns = gae(R3, V3, M3, gamma=0.9, lam=0.95)
    assert close(advantages, [[0.2849575, 0.2865, 0.3]])
    assert close(returns, [[0.7849575, 0.8865, 1.0]])


def test_padding_does_not_leak():
    """Row 1 has 2 tokens, r = [0, 2], V = [0.1, 0.3], and garbage (r = 5, V = 9) at its padding.
    gamma = 0.9, lam = 0.95: delta_1 = 2 - 0.3 = 1.7, delta_0 = 0.9 * 0.3 - 0.1 = 0.17,
    A = [0.17 + 0.855 * 1.7, 1.7] = [1.6235, 1.7], R = [1.7235, 2.0]. Row 2 is fully masked."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0], [3.0, 3.0, 3.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.1, 0.3, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    assert close(advantages[0], [0.2849575, 0.2865, 0.3])  # the same as on its own
    assert close(advantages[1], [1.6235, 1.7, 0.0])
    assert close(returns[1], [1.7235, 2.0, 0.0])
    assert torch.all(advantages[2] == 0) and torch.all(returns[2] == 0)
    # whatever sits in the padding, nothing changes
    rewards[1, 2], values[1, 2] = -100.0, 100.0
    again, again_returns = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    assert torch.equal(again, advantages) and torch.equal(again_returns, returns)


def definition(rewards, values, lengths, gamma, lam):
    """A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V_n = 0: a direct
    double sum in Python floats."""
    out = []
    for r, v, n in zip(rewards.tolist(), values.tolist(), lengths):
        v = v[:n] + [0.0]
        delta = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        row = [sum((gamma * lam) ** l * delta[t + l] for l in range(n - t)) for t in range(n)]
        out.append(row + [0.0] * (len(r) - n))
    return torch.tensor(out)


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.9, 0.95), (0.99, 0.0), (0.5, 0.7)])
def test_matches_the_definition_on_random_rows(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 4]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    rewards, values = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected = definition(rewards, values, lengths, gamma, lam)
    assert torch.allclose(advantages, expected, atol=1e-5)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-5)
    if lam == 0.0:  # one-step TD error
        nxt = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(4, 1)], dim=1)
        assert torch.allclose(advantages, (rewards + gamma * nxt - values) * mask, atol=1e-6)


def test_token_rewards_outcome_on_last_token_minus_kl_everywhere():
    """kl_coef = 0.5. Row 0 (3 tokens, outcome 1): [-0.05, -0.1, -0.15 + 1]; row 1 (2 tokens,
    outcome 2): [-0.2, -0.25 + 2, 0]; row 2 (masked): zeros, its outcome dropped."""
    outcome = torch.tensor([1.0, 2.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    assert close(token_rewards(outcome, kl, mask, 0.5), [[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0], [0.0, 0.0, 0.0]])
    assert close(token_rewards(outcome, None, mask, 0.5), [[0, 0, 1.0], [0, 2.0, 0], [0, 0, 0]])
    assert close(token_rewards(outcome, kl, mask, 0.0), [[0, 0, 1.0], [0, 2.0, 0], [0, 0, 0]])


def test_whiten_over_masked_tokens_of_the_whole_batch():
    """Tokens 1, 2, 3 (row 0) and 4 (row 1; its 100 is padding): mean 2.5, unbiased variance
    (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    s = math.sqrt(5 / 3 + 1e-8)
    expected = [[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]]
    out = whiten(x, mask)
    assert close(out, expected)
    kept = out[mask.bool()]
    assert abs(float(kept.mean())) < 1e-6 and float(kept.std()) == pytest.approx(1.0, abs=1e-6)
    assert close(whiten(x, mask, shift_mean=False), [[2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s], [2.5 + 1.5 / s, 0, 0]])
    assert torch.all(whiten(x, torch.zeros_like(mask)) == 0)
    assert torch.all(whiten(x, torch.tensor([[0, 1, 0], [0, 0, 0]])) == 0)  # one token: centred to 0
