"""GRPO group advantages and truncated importance weights against hand-computed values.

Group [1, 0, 0, 1]: mean 0.5, centred [0.5, -0.5, -0.5, 0.5], unbiased variance (4 * 0.25) / 3 = 1/3,
std = sqrt(1/3) = 0.57735, so A = +-0.5 / (0.57735 + eps) = +-0.86588 with eps = 1e-4 (+-0.86603 with eps = 0).
Group [1, 1, 1, 1]: all equal -> A = 0.
Group [3, 1]: mean 2, centred [1, -1], std sqrt(2) -> A = +-1 / (1.41421 + eps).
"""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.learners.advantages import group_advantages, truncated_importance_weights


def test_two_groups_scaled_by_group_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(group_advantages(rewards, 4), expected, atol=1e-6)
    assert abs(a - 0.86588) < 1e-5  # the hand-computed number itself


def test_eps_is_added_to_the_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    half_sqrt3 = math.sqrt(3) / 2  # 0.5 / sqrt(1/3)
    assert torch.allclose(group_advantages(rewards, 4, eps=0.0), torch.tensor([1, -1, -1, 1]) * half_sqrt3)
    two = group_advantages(torch.tensor([3.0, 1.0]), 2, eps=0.5)
    assert torch.allclose(two, torch.tensor([1.0, -1.0]) / (math.sqrt(2) + 0.5))


def test_scale_none_only_centres():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(group_advantages(rewards, 4, scale="none"), expected)
    three = group_advantages(torch.tensor([2.0, 0.0, 1.0]), 3, scale="none")  # mean 1
    assert torch.allclose(three, torch.tensor([1.0, -1.0, 0.0]))


def test_all_equal_group_and_singleton_groups_give_zero():
    assert torch.equal(group_advantages(torch.tensor([0.7, 0.7, 0.7]), 3), torch.zeros(3))
    assert torch.equal(group_advantages(torch.tensor([0.0, 0.0]), 2), torch.zeros(2))
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0, 5.0]), 1), torch.zeros(3))


def test_bad_group_size_or_scale_raises():
    with pytest.raises(ValueError, match="groups of 2"):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError, match="unknown advantage scale"):
        group_advantages(torch.ones(4), 2, scale="batch")


def test_truncated_importance_weights_hand_computed():
    """w = min(exp(learner - sampler), cap) on completion tokens, 0 on padding."""
    learner = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 9.0]])
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-1.5, -3.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = truncated_importance_weights(learner, sampler, mask, cap=2.0)
    expected = torch.tensor(
        [
            [math.exp(0.5), math.exp(-1.0), 0.0],  # 1.6487, 0.3679, padding
            [2.0, math.exp(0.2), 0.0],  # exp(1.4) = 4.055 capped at 2; 1.2214; padding (exp(9) ignored)
        ]
    )
    assert torch.allclose(w, expected, atol=1e-6)


def test_equal_logprobs_give_unit_weights():
    logps = torch.tensor([[-0.3, -2.0], [-1.0, -0.01]])
    w = truncated_importance_weights(logps, logps.clone(), torch.ones(2, 2), cap=1.5)
    assert torch.equal(w, torch.ones(2, 2))


def test_invalid_samples_are_left_out_of_their_groups_mean_and_std():
    """Group [1, None, 0, 0] -> the valid [1, 0, 0]: mean 1/3, centred [2/3, -1/3, -1/3], unbiased variance
    (4/9 + 1/9 + 1/9) / 2 = 1/3, std 0.57735 -> A = [1.15450, 0, -0.57725, -0.57725]; the masked one gets 0.
    Group [2, 4, None, None] -> valid [2, 4]: mean 3, std sqrt(2) -> A = [-1, 1] / (1.41421 + eps), 0, 0."""
    nan = float("nan")
    rewards = torch.tensor([1.0, nan, 0.0, 0.0, 2.0, 4.0, 123.0, nan])  # values at invalid positions are ignored
    valid = torch.tensor([True, False, True, True, True, True, False, False])
    s3, s2 = math.sqrt(1 / 3) + 1e-4, math.sqrt(2) + 1e-4
    expected = torch.tensor([(2 / 3) / s3, 0.0, -(1 / 3) / s3, -(1 / 3) / s3, -1 / s2, 1 / s2, 0.0, 0.0])
    out = group_advantages(rewards, 4, valid=valid)
    assert torch.allclose(out, expected, atol=1e-6)
    assert abs(expected[0] - 1.15450) < 1e-5 and abs(expected[2] + 0.57725) < 1e-5
    # identical to the valid subgroup on its own, and not to reading the None as 0
    sub = group_advantages(torch.tensor([1.0, 0.0, 0.0]), 3)
    assert torch.allclose(out[[0, 2, 3]], sub, atol=1e-6)
    as_zero = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    assert not torch.allclose(out[:4], as_zero)
    centred = group_advantages(rewards, 4, scale="none", valid=valid)
    assert torch.allclose(centred, torch.tensor([2 / 3, 0, -1 / 3, -1 / 3, -1, 1, 0, 0]), atol=1e-6)


def test_group_with_fewer_than_two_valid_samples_gets_zero():
    rewards = torch.tensor([5.0, 1.0, 0.0, 3.0, 0.0, 1.0])
    valid = torch.tensor([True, False, False, False, False, False])
    assert torch.equal(group_advantages(rewards, 3, valid=valid), torch.zeros(6))
    assert torch.equal(group_advantages(rewards, 3, scale="none", valid=valid), torch.zeros(6))
    with pytest.raises(ValueError, match="validity mask"):
        group_advantages(rewards, 3, valid=torch.ones(4, dtype=torch.bool))
