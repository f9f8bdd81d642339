"""Advantages and importance weights for group-based policy gradients (GRPO)."""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, optionally divided by the group's std.

    For group g with rewards r_{g,1..n}:  mean_g = (1/n) sum_i r_{g,i},
    std_g = sqrt( (1/(n-1)) sum_i (r_{g,i} - mean_g)^2 )  (unbiased, as TRL uses), and

        A_{g,i} = (r_{g,i} - mean_g) / (std_g + eps)   if scale == "group"
        A_{g,i} =  r_{g,i} - mean_g                    if scale == "none"

    A group whose rewards are all equal gets A = 0 for every member (no learning signal).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred.flatten()
    if scale != "group":
        raise ValueError(f"unknown advantage scale {scale!r}; use 'group' or 'none'")
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
    return (centred / (std + eps)).flatten()


def truncated_importance_weights(
    learner_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Per-token truncated importance weights (TIS) correcting for samples drawn from an older policy.

        w_t = min( exp(log pi_learner(y_t) - log pi_sampler(y_t)), cap )    on completion tokens,
        w_t = 0                                                              on padding.

    pi_sampler is the policy version that generated the sample (vLLM's sampling logprobs) and
    pi_learner the learner's policy before this update. TRL's GRPO loss multiplies each token's
    loss by w_t (its `importance_sampling_ratio` input).
    """
    ratio = torch.exp(learner_logps - sampling_logps).clamp(max=cap)
    return ratio * mask
