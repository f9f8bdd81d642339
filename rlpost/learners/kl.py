"""Schulman's per-token estimators of KL(q || p) from tokens y sampled from q ("Approximating KL
divergence", 2020). With log r = log p(y) - log q(y):

    k1 = -log r                 unbiased, high variance, negative on some tokens
    k2 = (log r)^2 / 2          biased (exact to second order in log r), low variance, >= 0
    k3 = (r - 1) - log r        unbiased (E_q[r] = 1), low variance, >= 0

Where the learners use them:
- PPO's KL-in-the-reward (`kl_coef`, InstructGPT-style) pays kl_coef * k1 per token with q = pi_old
  (the sampling policy, re-scored) and p = pi_ref: k1 = log pi_old - log pi_ref;
- PPO's logged `train/approx_kl` between the updated policy and pi_old is k2 (as TRL's former PPO);
- TRL's `beta` term in the GRPO/PPO loss is k3 with q = pi_theta and p = pi_ref (TRL computes it;
  tests/test_learner_defects.py checks it against `k3`), and `train/kl_sampler_to_learner` is k3
  with q = the vLLM sampler and p = the learner's pi_old.
"""

from __future__ import annotations

import torch


def k1(q_logps: torch.Tensor, p_logps: torch.Tensor) -> torch.Tensor:
    """-log r = log q(y) - log p(y), per token."""
    return q_logps - p_logps


def k2(q_logps: torch.Tensor, p_logps: torch.Tensor) -> torch.Tensor:
    """(log r)^2 / 2, per token."""
    return 0.5 * (p_logps - q_logps) ** 2


def k3(q_logps: torch.Tensor, p_logps: torch.Tensor) -> torch.Tensor:
    """exp(log r) - 1 - log r, per token."""
    log_r = p_logps - q_logps
    return torch.exp(log_r) - 1 - log_r
