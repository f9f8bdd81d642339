"""Advantages and importance weights for group-based policy gradients (GRPO, RLOO)."""

from __future__ import annotations

import torch


def _valid_groups(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None):
    """Rewards as (groups, group_size) with invalid entries 0, the validity mask, the valid count per
    group (keepdim) and a zero of the rewards' dtype: what every group baseline starts from."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.reshape(-1, group_size)
    if valid is None:
        ok = torch.ones_like(grouped, dtype=torch.bool)
    else:
        if valid.numel() != rewards.numel():
            raise ValueError(f"validity mask has {valid.numel()} entries for {rewards.numel()} rewards")
        ok = valid.reshape(-1, group_size).bool()
    zero = torch.zeros((), dtype=grouped.dtype)
    return torch.where(ok, grouped, zero), ok, ok.sum(dim=1, keepdim=True), zero


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, optionally divided by the group's std,
    computed over the *valid* samples of each group only.

    `valid[i]` (bool, default all True) says whether sample i has a reward; the value of `rewards`
    at an invalid position is ignored (any number or NaN). For group g let V_g be its valid samples
    and n_g = |V_g|. For i in V_g:

        mean_g = (1/n_g) sum_{j in V_g} r_{g,j}
        std_g  = sqrt( (1/(n_g-1)) sum_{j in V_g} (r_{g,j} - mean_g)^2 )   (unbiased, as TRL uses)

        A_{g,i} = (r_{g,i} - mean_g) / (std_g + eps)   if scale == "group"
        A_{g,i} =  r_{g,i} - mean_g                    if scale == "none"

    and A_{g,i} = 0 for every invalid i. A group with n_g < 2 gets A = 0 for all its members (no
    baseline can be formed), as does a group whose valid rewards are all equal (no learning
    signal). So group [1, None, 0, 0] gives the advantages of [1, 0, 0] at its valid positions and 0
    at the masked one: a missing reward is never read as 0.
    """
    if scale not in ("group", "none"):
        raise ValueError(f"unknown advantage scale {scale!r}; use 'group' or 'none'")
    values, ok, count, zero = _valid_groups(rewards, group_size, valid)
    mean = values.sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(ok, values - mean, zero)
    if scale == "group":
        std = ((centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        centred = centred / (std + eps)
    return torch.where(count >= 2, centred, zero).flatten()


def rloo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """RLOO advantages (REINFORCE Leave-One-Out; Ahmadian et al. 2024, TRL's `RLOOTrainer`): each
    reward minus the mean reward of the *other* valid samples of its group.

    `valid[i]` (bool, default all True) says whether sample i has a reward; the value of `rewards`
    at an invalid position is ignored (any number or NaN). For group g with valid samples V_g and
    k = |V_g|, for i in V_g:

        b_{g,i}  = (1/(k-1)) sum_{j in V_g, j != i} r_{g,j}          (leave-one-out baseline)
        A_{g,i}  = r_{g,i} - b_{g,i}
                 = k/(k-1) * (r_{g,i} - mean_g),   mean_g = (1/k) sum_{j in V_g} r_{g,j}

    and A_{g,i} = 0 for every invalid i. A group with k < 2 valid samples gets A = 0 for all its
    members (no other sample to form a baseline from). A group whose valid rewards are all equal
    gets A = 0 by the formula. The baseline of sample i does not depend on r_i, so the estimator
    sum_i A_i grad log pi(y_i) is unbiased.

    No scaling: TRL 1.16's `RLOOTrainer` leaves advantages unscaled by default
    (`RLOOConfig.normalize_advantages=False`; when set it standardises over the whole generation
    batch, not per group), and this follows that default. With the same rewards (and a NaN reward
    where `valid` is False) the values equal `RLOOTrainer`'s: its
    `(nansum(group) - r_i) / (scorable - 1)` baseline, NaN -> 0 (see tests/test_rloo.py).

    Group [1, 0, 0, 1]: baselines [1/3, 2/3, 2/3, 1/3], A = [2/3, -2/3, -2/3, 2/3]
    (= 4/3 * (r - 0.5)). Group [1, None, 0, 0]: k = 3, A = [1, 0, -0.5, -0.5].
    """
    if not rewards.is_floating_point():
        rewards = rewards.float()
    values, ok, count, zero = _valid_groups(rewards, group_size, valid)
    baseline = (values.sum(dim=1, keepdim=True) - values) / (count - 1).clamp(min=1)
    return torch.where(ok & (count >= 2), values - baseline, zero).flatten()


def truncated_importance_weights(
    learner_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Per-token truncated importance weights (TIS) correcting for samples drawn from an older policy.

        w_t = min( exp(log pi_learner(y_t) - log pi_sampler(y_t)), cap )    on completion tokens,
        w_t = 0                                                              on padding.

    pi_sampler is the policy version that generated the sample (vLLM's sampling logprobs) and
    pi_learner the learner's policy before the batch's first update (pi_old): the weights stay
    fixed over all the optimiser steps of a batch (`num_iterations` x `steps_per_generation`).
    TRL's GRPO loss multiplies each token's loss by w_t (its `importance_sampling_ratio` input).
    """
    ratio = torch.exp(learner_logps - sampling_logps).clamp(max=cap)
    return ratio * mask


def importance_weight_stats(weights: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """`rollout/importance_weight_{mean,min,max}` of the truncated weights over completion tokens
    (NaN without any): how far off-policy the batch the learner trained on was."""
    kept = weights[mask.bool()]
    if kept.numel() == 0:
        return {f"rollout/importance_weight_{k}": float("nan") for k in ("mean", "min", "max")}
    return {"rollout/importance_weight_mean": float(kept.mean()), "rollout/importance_weight_min": float(kept.min()),
            "rollout/importance_weight_max": float(kept.max())}
