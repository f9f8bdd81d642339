"""Implicit process rewards: dense per-token rewards from a model trained only on outcome labels.

Yuan et al. 2024, "Free Process Rewards without Process Labels" (arXiv:2412.01981), used by PRIME
(Cui et al. 2025). Parameterise the outcome reward of a completion y = (y_1..y_T) to a prompt x as
a scaled log-likelihood ratio between a trainable model pi_theta and a frozen reference pi_ref:

    l_t  = log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)        (token log ratio)
    r(y) = beta * sum_{t=1..T} l_t                                         (outcome reward)

Train pi_theta on outcome labels o in {0, 1} (e.g. "the verifier accepted y") with cross-entropy
on sigma(r(y)), the paper's CE objective:

    L = -(1/N) sum_i [ o_i log sigma(r(y_i)) + (1 - o_i) log(1 - sigma(r(y_i))) ]

The paper shows that the partial sums q_t = beta * sum_{i<=t} l_i are then Q-values of the
outcome reward, so the process reward of token t is q_t - q_{t-1}:

    r_t = beta * l_t,        sum_t r_t = r(y)

No step labels are needed: the dense rewards come for free from the outcome-trained model.
Sequences are right-padded, so each row's positions start at 0 as they do unpadded.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F

from rewards.errors import UserError

TokenIds = Sequence[int] | torch.Tensor
DEFAULT_BETA = 0.05  # PRIME's setting


def _as_list(ids: TokenIds) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


def _check_batch(prompt_ids: Sequence[TokenIds], completion_ids: Sequence[TokenIds]) -> None:
    if len(prompt_ids) != len(completion_ids):
        raise UserError(f"implicit PRM got {len(prompt_ids)} prompts for {len(completion_ids)} completions; "
                        f"give one prompt per completion")
    for i, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise UserError(f"implicit PRM: prompt {i} is empty; the first completion token needs a context "
                            f"(prepend a BOS token)")


def completion_logprobs(model, prompt_ids: Sequence[TokenIds], completion_ids: Sequence[TokenIds],
                        batch_size: int = 64) -> list[torch.Tensor]:
    """log model(y_t | x, y_<t) for every completion token, one 1-D tensor per sample.

    Rows are `prompt + completion`, right-padded; the logits at position p + t - 1 (p = prompt
    length) predict completion token t. Gradients flow when grad mode is on.
    """
    _check_batch(prompt_ids, completion_ids)
    out: list[torch.Tensor] = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts = [_as_list(p) for p in prompt_ids[start:start + batch_size]]
        completions = [_as_list(c) for c in completion_ids[start:start + batch_size]]
        out += _batch_logprobs(model, prompts, completions)
    return out


def _batch_logprobs(model, prompts: list[list[int]], completions: list[list[int]]) -> list[torch.Tensor]:
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    device = next(model.parameters()).device
    input_ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    attention = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, :len(row)] = 1
    logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
    logprobs = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return [logprobs[i, len(p) - 1:len(p) - 1 + len(c)] for i, (p, c) in enumerate(zip(prompts, completions))]


def token_log_ratios(policy, reference, prompt_ids: Sequence[TokenIds], completion_ids: Sequence[TokenIds],
                     batch_size: int = 64) -> list[torch.Tensor]:
    """l_t = log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) per completion token.

    The reference is evaluated without gradient; the policy term carries gradient when grad mode is on.
    """
    with torch.no_grad():
        ref = completion_logprobs(reference, prompt_ids, completion_ids, batch_size)
    pol = completion_logprobs(policy, prompt_ids, completion_ids, batch_size)
    return [p - r for p, r in zip(pol, ref)]


def implicit_process_rewards(policy, reference, prompt_ids: Sequence[TokenIds],
                             completion_ids: Sequence[TokenIds], beta: float = DEFAULT_BETA,
                             batch_size: int = 64) -> list[list[float]]:
    """Dense rewards r_t = beta * l_t for every completion token (no gradient); sum_t r_t = r(y)."""
    with torch.no_grad():
        ratios = token_log_ratios(policy, reference, prompt_ids, completion_ids, batch_size)
    return [(beta * r).tolist() for r in ratios]


def outcome_loss_from_log_ratios(log_ratios: Sequence[torch.Tensor], labels: Sequence[float] | torch.Tensor,
                                 beta: float = DEFAULT_BETA) -> torch.Tensor:
    """L = -mean_i [o_i log sigma(beta S_i) + (1 - o_i) log(1 - sigma(beta S_i))], S_i = sum_t l_it.

    Computed as binary cross-entropy with logits beta * S_i (numerically stable for large |S_i|).
    """
    if len(log_ratios) != len(labels) or len(labels) == 0:
        raise UserError(f"implicit PRM loss needs one outcome label per completion, got {len(labels)} labels "
                        f"for {len(log_ratios)} completions")
    sums = torch.stack([r.sum() for r in log_ratios])
    target = torch.as_tensor(labels, dtype=sums.dtype, device=sums.device)
    if ((target != 0) & (target != 1)).any():
        raise UserError("implicit PRM outcome labels must be 0 or 1")
    return F.binary_cross_entropy_with_logits(beta * sums, target)


def implicit_prm_loss(policy, reference, prompt_ids: Sequence[TokenIds], completion_ids: Sequence[TokenIds],
                      labels: Sequence[float] | torch.Tensor, beta: float = DEFAULT_BETA,
                      batch_size: int = 64) -> torch.Tensor:
    """The paper's cross-entropy loss on outcome labels (see `outcome_loss_from_log_ratios`), with gradient."""
    ratios = token_log_ratios(policy, reference, prompt_ids, completion_ids, batch_size)
    return outcome_loss_from_log_ratios(ratios, labels, beta)


class ImplicitPRM:
    """A trainable policy plus a frozen reference; learners call `rewards` for dense per-token rewards.

    `ImplicitPRM.from_model(model)` starts both from the same weights (PRIME initialises the PRM
    and its reference from the SFT model), so every reward is 0 before training.
    """

    def __init__(self, policy, reference, beta: float = DEFAULT_BETA, batch_size: int = 64):
        if not beta > 0:
            raise UserError(f"implicit PRM beta must be > 0, got {beta}")
        self.policy, self.reference, self.beta, self.batch_size = policy, reference, beta, batch_size
        self.reference.eval()
        self.reference.requires_grad_(False)

    @classmethod
    def from_model(cls, model, beta: float = DEFAULT_BETA, batch_size: int = 64) -> "ImplicitPRM":
        """The PRM trains `model` in place; the reference is a frozen copy of its current weights."""
        return cls(model, copy.deepcopy(model), beta, batch_size)

    def parameters(self):
        """The trainable parameters (the policy's): give these to the optimiser."""
        return self.policy.parameters()

    def rewards(self, prompt_ids: Sequence[TokenIds], completion_ids: Sequence[TokenIds]) -> list[list[float]]:
        """r_t = beta * l_t per completion token, one list per sample."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            return implicit_process_rewards(self.policy, self.reference, prompt_ids, completion_ids,
                                            self.beta, self.batch_size)
        finally:
            self.policy.train(was_training)

    def outcome_rewards(self, prompt_ids: Sequence[TokenIds], completion_ids: Sequence[TokenIds]) -> list[float]:
        """r(y) = beta * sum_t l_t per sample (the sum of `rewards`)."""
        return [sum(r) for r in self.rewards(prompt_ids, completion_ids)]

    def loss(self, prompt_ids: Sequence[TokenIds], completion_ids: Sequence[TokenIds],
             labels: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """The outcome-label cross-entropy for a batch, with gradient to the policy."""
        return implicit_prm_loss(self.policy, self.reference, prompt_ids, completion_ids, labels,
                                 self.beta, self.batch_size)
