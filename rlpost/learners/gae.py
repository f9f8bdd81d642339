"""Per-token rewards, generalised advantage estimation (GAE) and whitening for PPO: pure functions.

Every tensor is (B, T): one row per completion, one column per completion token, right padded.
`mask` is 1 on completion tokens and 0 on padding (a row of zeros is a sample that is not trained
on: everything computed for it is 0). A completion is one episode: token t is the action taken in
state s_t = (prompt, y_<t), the episode ends after the last completion token, so the value of the
state after it is 0 (no bootstrapping from a truncated completion either: a completion cut at the
length budget is scored as it stands, and its reward is its return).
"""

from __future__ import annotations

import torch


def token_rewards(outcome: torch.Tensor, kl_per_token: torch.Tensor | None, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """Per-token rewards with the KL penalty in the reward (InstructGPT; TRL's former PPOTrainer).

    For row i with completion tokens t = 0 .. n_i - 1 (n_i = sum_t mask_{i,t}, right padded):

        r_{i,t} = -kl_coef * kl_{i,t} + [t = n_i - 1] * outcome_i     for t < n_i
        r_{i,t} = 0                                                    on padding

    so the outcome reward (the verifier's score of the whole completion) arrives on the last
    completion token and every token pays kl_coef times its KL estimate. The learner passes the k1
    estimate kl_{i,t} = log pi_old(y_t) - log pi_ref(y_t) (summed over a completion it is the log
    ratio of the sequence probabilities, an unbiased estimate of KL(pi_old || pi_ref) from samples of
    pi_old); `kl_per_token` None (or kl_coef = 0) means no penalty. A row whose mask is all 0 gets
    no outcome either: all its rewards are 0.
    """
    mask = mask.to(outcome.dtype if outcome.is_floating_point() else torch.float32)
    rewards = torch.zeros_like(mask)
    if kl_per_token is not None and kl_coef != 0:
        rewards = rewards - kl_coef * kl_per_token.to(rewards.dtype) * mask
    lengths = mask.sum(dim=1).long()
    rows = torch.nonzero(lengths > 0).flatten()
    rewards[rows, lengths[rows] - 1] += outcome.to(rewards.dtype)[rows]
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (Schulman et al. 2016), per token.

    With V_t = values[:, t] the value of state s_t (before token t) and V_{n} = 0 after the last
    completion token t = n - 1 (the episode ends there):

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = sum_{l >= 0} (gamma * lam)^l * delta_{t+l}  =  delta_t + gamma * lam * A_{t+1},   A_n = 0
        R_t     = A_t + V_t        (the lambda-return, the value target)

    computed by the backward recursion. gamma = lam = 1 gives A_t = (sum_{u >= t} r_u) - V_t (the
    Monte-Carlo return minus the baseline); lam = 0 gives the one-step TD error delta_t.

    Padding does not leak: rewards and values are zeroed where mask = 0, V_{t+1} is read only where
    mask_{t+1} = 1, and A and R are 0 on padding (a mask 0 inside a row ends the episode there, as
    if it were padding). Returns (advantages, returns), both (B, T), without gradient.
    """
    if rewards.shape != values.shape or values.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same (B, T) shape")
    rewards, values = rewards.detach().float(), values.detach().float()
    m = mask.float()
    rewards, values = rewards * m, values * m
    steps = values.size(1)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] * m[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        next_running = running * m[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * next_running) * m[:, t]
        advantages[:, t] = running
    returns = (advantages + values) * m
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """x standardised over the tokens where mask = 1 (TRL's former `masked_whiten`):

        mu  = sum(m x) / sum(m)
        var = sum(m (x - mu)^2) / (sum(m) - 1)        (unbiased)
        out = (x - mu) / sqrt(var + eps)              (+ mu again when shift_mean is False)

    and 0 where mask = 0. Statistics are over the whole batch (all rows' tokens together), so
    PPO's whitened advantages have mean 0 and standard deviation 1 over the batch's trained tokens.
    With fewer than two tokens var is taken as 0 (out = 0 with shift_mean); with no token the result
    is all 0.
    """
    m = mask.float()
    count = m.sum()
    if count == 0:
        return torch.zeros_like(x, dtype=torch.float32)
    x = x.float()
    mean = (x * m).sum() / count
    var = (((x - mean) ** 2) * m).sum() / (count - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m
