"""PRIME learner: dense per-token rewards from an implicit PRM trained online, in TRL's GRPO loss.

PRIME (Cui et al. 2025, "Process Reinforcement through Implicit Rewards", arXiv:2502.01456). The
implicit PRM (`rewards.implicit_prm`, Yuan et al. 2024) is a causal LM pi_phi scored against a
frozen reference pi_ref; both start as copies of the stage's starting policy (so every process
reward is 0 before the PRM's first update). With beta = `prm_beta`:

    l_t    = log pi_phi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)          (token log ratio)
    r_t    = beta * l_t                                                      (process reward of token t)
    r(y)   = sum_{t=1..|y|} r_t = beta * sum_t l_t                           (implicit outcome reward)

One rollout batch (groups of K samples of a prompt), in this order:

1. PRM update, on outcome labels. For every sample with a reward (masked samples, reward None or
   not finite, never enter), o_i = [r_o(y_i) >= outcome_threshold] (r_o: the reward pool's
   outcome reward), and `prm_steps` AdamW steps (learning rate `prm_learning_rate`, gradients
   clipped to `max_grad_norm`) on the cross-entropy of sigma(r(y_i)) against o_i
   (`rewards.implicit_prm.outcome_loss_from_log_ratios`):

       L_PRM = -(1/N) sum_i [ o_i log sigma(r(y_i)) + (1 - o_i) log(1 - sigma(r(y_i))) ]

   Every labelled sample enters, also those of groups with < 2 valid samples (a label needs no
   baseline). Reported from the first PRM step of the batch, i.e. from the PRM as it was before it
   saw the batch: `train/prm_loss` = L_PRM and `train/prm_accuracy` = (1/N) sum_i [ [r(y_i) > 0] = o_i ].

2. Process rewards r_t^i from the *updated* PRM (no gradient).

3. Advantages (`prime_advantages`), PRIME's RLOO form, per token t of sample i of a group whose
   valid samples V number k = |V| (|y^j| the completion length of sample j):

       A_t^i = [ r_o(y^i) - (1/(k-1)) sum_{j in V, j != i} r_o(y^j) ]                       (outcome, RLOO)
             + c * sum_{s=t..|y^i|} gamma^{s-t} [ r_s^i - (1/(k-1)) sum_{j in V, j != i} (1/|y^j|) sum_u r_u^j ]
                                                                            (process return, RLOO baseline)

   with c = `process_reward_coef`. The outcome term is the same on every token of y^i
   (`advantages.rloo_advantages`); the process term is the discounted return-to-go of the token
   rewards, each centred by the leave-one-out mean of the other samples' mean token reward. A_t^i =
   0 on padding, for a masked sample (it does not enter the others' baselines either) and for every
   sample of a group with k < 2 (no baseline: `advantages._valid_groups`' rules). A completion of
   length 0 counts as mean token reward 0.

4. The policy update: `GRPOLearner`'s, unchanged (rlpost.learners.grpo's docstring: pi_old, sampler
   importance weights, `num_iterations` x `steps_per_generation` optimiser steps on TRL's clipped
   surrogate, optional k3 KL to the reference with `beta`), with the (B, T) advantages A_t^i in
   place of GRPO's (B,) ones. TRL's `_compute_loss` takes (B, T) advantages as they are (it
   unsqueezes only 1-D ones; pinned by tests/test_ppo.py), so per token

       loss_{i,t} = -min(rho_{i,t} A_t^i, clip(rho_{i,t}, 1 - eps_low, 1 + eps_high) A_t^i) * w_{i,t} + beta_KL * KL_{i,t}

Differences from PRIME's released (verl) code, on purpose: the paper's formula above is used as
written (verl's implementation centres each token reward as r_t K/(K-1) - sum_j mean_j/(K-1), which
differs by (r_t - mean_i)/(K-1)), and advantages are not whitened over the batch.

Also reported: `train/process_reward_mean` (mean r_t over the tokens of the samples with a reward),
`train/process_advantage_abs_mean` (mean |c * process return| over the trained tokens),
`train/prm_samples` (N), `train/prm_label_mean` (mean o_i), `train/prm_grad_norm`, `train/prm_step_s`,
`train/prm_nonfinite_updates` (PRM updates skipped by `rlpost.learners.update.apply_update` for a
NaN/inf loss or gradient norm; `train/nonfinite_updates` counts the policy's and the PRM's, and
`train/nonfinite_step` is 1 when all of the step's attempted updates, both kinds, were skipped),
and everything `GRPOLearner.step` reports (`train/step_s` includes the PRM's time).

Checkpoints: `extra_state()` holds the PRM's weights (`prm.<state_dict key>`) and its AdamW state
flattened into tensors (`prm_opt.<i>.exp_avg`, `prm_opt.<i>.exp_avg_sq`, `prm_opt.<i>.step`, i the
parameter's index in the optimiser), so a resumed run continues exactly. The reference is the
stage's starting policy and is reloaded, not saved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rewards.implicit_prm import completion_logprobs, outcome_loss_from_log_ratios
from rlpost.learners.advantages import _valid_groups, rloo_advantages
from rlpost.learners.grpo import GRPOLearner, LearnerSettings, _right_pad, disable_dropout, flatten_groups
from rlpost.learners.update import apply_update
from rollouts.buffer import RolloutGroup

PRM_PREFIX, PRM_OPT_PREFIX = "prm.", "prm_opt."


@dataclass
class PrimeSettings:
    prm_beta: float = 0.05  # PRIME's
    prm_learning_rate: float = 1e-3  # the stage's default (see its help)
    prm_steps: int = 1  # AdamW steps of the PRM per rollout batch
    process_reward_coef: float = 1.0
    gamma: float = 1.0
    outcome_threshold: float = 0.5
    prm_batch_size: int = 64  # rows per PRM forward pass


def process_returns(process_rewards: torch.Tensor, mask: torch.Tensor, group_size: int,
                    valid: torch.Tensor | None = None, gamma: float = 1.0) -> torch.Tensor:
    """The process part of PRIME's advantage, before the coefficient, shape (B, T):

        G_t^i = sum_{s >= t} gamma^{s-t} [ r_s^i - b_i ],   b_i = (1/(k-1)) sum_{j in V, j != i} m_j,
        m_j   = (1/|y^j|) sum_u r_u^j

    `process_rewards` (B, T) right-padded token rewards, `mask` (B, T) 1 on completion tokens
    (values at padding are ignored), `valid` (B,) samples with a reward. G = 0 on padding, for
    invalid samples and for groups with fewer than 2 valid samples."""
    m = mask.to(process_rewards.dtype)
    rewards = torch.where(mask.bool(), process_rewards, torch.zeros((), dtype=process_rewards.dtype))
    lengths = m.sum(dim=1)
    means = rewards.sum(dim=1) / lengths.clamp(min=1)
    values, ok, count, zero = _valid_groups(means, group_size, valid)
    baseline = ((values.sum(dim=1, keepdim=True) - values) / (count - 1).clamp(min=1)).flatten()
    keep = (ok & (count >= 2)).flatten().to(process_rewards.dtype)
    centred = (rewards - baseline[:, None]) * m * keep[:, None]
    returns = torch.zeros_like(centred)
    running = torch.zeros_like(centred[:, 0])
    for t in range(centred.size(1) - 1, -1, -1):  # G_t = d_t + gamma * G_{t+1}; d = 0 on padding
        running = centred[:, t] + gamma * running
        returns[:, t] = running
    return returns * m


def prime_advantages(outcome_rewards: torch.Tensor, process_rewards: torch.Tensor, mask: torch.Tensor,
                     group_size: int, valid: torch.Tensor | None = None, process_reward_coef: float = 1.0,
                     gamma: float = 1.0) -> torch.Tensor:
    """PRIME's advantages A_t^i (B, T) (module docstring): the RLOO outcome advantage on every token
    plus `process_reward_coef` x `process_returns`. `outcome_rewards` (B,) (values of invalid samples
    ignored), `process_rewards` and `mask` (B, T), `valid` (B,) (default all valid)."""
    m = mask.to(process_rewards.dtype)
    outcome = rloo_advantages(outcome_rewards.to(process_rewards.dtype), group_size, valid=valid)
    process = process_returns(process_rewards, mask, group_size, valid, gamma)
    return outcome[:, None] * m + process_reward_coef * process


def _check_separate(a, b, what: str) -> None:
    if a is b:
        raise ValueError(f"{what} must be separate models")
    storage = {p.data_ptr() for p in a.parameters()}
    if any(p.data_ptr() in storage for p in b.parameters()):
        raise ValueError(f"{what} share parameters; pass independent copies")


class PrimeLearner(GRPOLearner):
    """`GRPOLearner` whose advantages are PRIME's (B, T) ones, with an implicit PRM trained online.

    `prm_model`: a trainable copy of the stage's starting policy (the PRM pi_phi); `prm_reference`:
    a frozen copy of it (pi_ref). `reference_model` (beta > 0) is the KL term's reference, as in
    `GRPOLearner`; it may be the same object as `prm_reference` (TRL's fused LM head, which
    `freeze_reference` adds, leaves the plain forward the PRM uses unchanged). One process only."""

    multi_process = False  # the PRM and its update are not sharded across processes

    def __init__(self, model, tokenizer, settings: LearnerSettings, prime: PrimeSettings, output_dir: str,
                 group_size: int, prm_model, prm_reference, reference_model=None):
        if not prime.prm_beta > 0:
            raise ValueError(f"prm_beta must be > 0, got {prime.prm_beta}")
        if not prime.prm_learning_rate > 0 or prime.prm_steps < 1:
            raise ValueError(f"prm_learning_rate ({prime.prm_learning_rate}) must be > 0 and prm_steps "
                             f"({prime.prm_steps}) >= 1")
        if not 0 <= prime.gamma <= 1 or not prime.process_reward_coef >= 0:
            raise ValueError(f"gamma ({prime.gamma}) must be in [0, 1] and process_reward_coef "
                             f"({prime.process_reward_coef}) >= 0")
        _check_separate(model, prm_model, "the policy and the PRM")
        _check_separate(model, prm_reference, "the policy and the PRM's reference")
        _check_separate(prm_model, prm_reference, "the PRM and its reference")
        super().__init__(model, tokenizer, settings, output_dir, group_size, reference_model=reference_model)
        self.prime = prime
        self.prm, self.prm_reference = prm_model, prm_reference
        disable_dropout(self.prm)
        self.prm.train()
        disable_dropout(self.prm_reference)
        self.prm_reference.requires_grad_(False)
        self.prm_reference.eval()
        self.prm_optimizer = torch.optim.AdamW(
            (p for p in self.prm.parameters() if p.requires_grad), lr=prime.prm_learning_rate, weight_decay=0.0)
        self._process_metrics: dict[str, float] = {}
        self._prm_results: list = []  # the PRM's updates of the current step (`apply_update` results)

    # ------------------------------------------------------------------------- the PRM

    def _log_ratios(self, prompts, completions, reference_logps=None) -> tuple[list[torch.Tensor], list]:
        """l_t per sample (gradient to the PRM when grad mode is on) and the reference's logprobs."""
        if reference_logps is None:
            with torch.no_grad():
                reference_logps = completion_logprobs(self.prm_reference, prompts, completions,
                                                      self.prime.prm_batch_size)
        prm_logps = completion_logprobs(self.prm, prompts, completions, self.prime.prm_batch_size)
        return [p - r for p, r in zip(prm_logps, reference_logps)], reference_logps

    def outcome_labels(self, groups: list[RolloutGroup]):
        """(prompts, completions, labels) of the samples with a reward: o = [reward >= outcome_threshold]."""
        prompts, completions, _, values, valid = flatten_groups(groups)
        keep = valid.tolist()
        labels = (values >= self.prime.outcome_threshold).float()[valid]
        return ([p for p, k in zip(prompts, keep) if k], [c for c, k in zip(completions, keep) if k], labels)

    def update_prm(self, groups: list[RolloutGroup]) -> dict[str, float]:
        """`prm_steps` AdamW steps on the outcome-label cross-entropy (module docstring, step 1)."""
        start = time.perf_counter()
        self._prm_results = []
        prompts, completions, labels = self.outcome_labels(groups)
        metrics = {"train/prm_samples": float(len(labels)),
                   "train/prm_label_mean": float(labels.mean()) if len(labels) else float("nan")}
        if not len(labels):  # nothing labelled: no step, optimiser state untouched
            metrics.update({"train/prm_loss": float("nan"), "train/prm_accuracy": float("nan"),
                            "train/prm_grad_norm": 0.0, "train/prm_nonfinite_updates": 0.0,
                            "train/prm_step_s": time.perf_counter() - start})
            return metrics
        device = next(self.prm.parameters()).device
        labels = labels.to(device)
        self.prm.train()
        reference_logps, grad_norms = None, []
        for k in range(self.prime.prm_steps):
            ratios, reference_logps = self._log_ratios(prompts, completions, reference_logps)
            loss = outcome_loss_from_log_ratios(ratios, labels, self.prime.prm_beta)
            if k == 0:
                with torch.no_grad():
                    scores = self.prime.prm_beta * torch.stack([r.sum() for r in ratios])
                    metrics["train/prm_loss"] = float(loss.detach())
                    metrics["train/prm_accuracy"] = float(((scores > 0).float() == labels).float().mean())
            result = apply_update(self.prm, self.prm_optimizer, loss, self.settings.max_grad_norm)
            self._prm_results.append(result)
            if result.applied:
                grad_norms.append(result.grad_norm)
        metrics["train/prm_grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        metrics["train/prm_nonfinite_updates"] = float(sum(not r.applied for r in self._prm_results))
        metrics["train/prm_step_s"] = time.perf_counter() - start
        return metrics

    @torch.no_grad()
    def process_rewards(self, prompts, completions) -> list[torch.Tensor]:
        """r_t = prm_beta * l_t per sample, with the PRM's current weights (no gradient)."""
        was_training = self.prm.training
        self.prm.eval()
        try:
            ratios, _ = self._log_ratios(prompts, completions)
        finally:
            self.prm.train(was_training)
        return [self.prime.prm_beta * r for r in ratios]

    # ------------------------------------------------------------------------- GRPO's hooks

    def build_inputs(self, groups: list[RolloutGroup], pi_old: bool = True) -> dict[str, torch.Tensor]:
        """`GRPOLearner.build_inputs` with `advantages` replaced by PRIME's (B, T) ones from the PRM's
        current weights; also `process_rewards` (B, T), `outcome_advantages` (B,) and
        `process_advantages` (B, T) (c x the process return)."""
        inputs = super().build_inputs(groups, pi_old)
        size = groups[0].size
        prompts, completions, _, outcome, valid = flatten_groups(groups)
        device = inputs["completion_ids"].device
        rewards = [r.detach().float().cpu().tolist() for r in self.process_rewards(prompts, completions)]
        process, padding = (t.to(device) for t in _right_pad(rewards, 0.0, torch.float32))
        if process.shape != inputs["completion_ids"].shape:
            raise RuntimeError(f"process rewards {tuple(process.shape)} do not line up with the completions "
                               f"{tuple(inputs['completion_ids'].shape)}")
        valid, outcome = valid.to(device), outcome.to(device)
        s = self.prime
        advantages = prime_advantages(outcome, process, padding, size, valid, s.process_reward_coef, s.gamma)
        process_adv = s.process_reward_coef * process_returns(process, padding, size, valid, s.gamma)
        outcome_adv = rloo_advantages(outcome, size, valid=valid)
        trained = inputs["completion_mask"].bool()
        scored = padding.bool() & valid[:, None]
        inputs.update({"advantages": advantages * inputs["completion_mask"], "process_rewards": process * padding,
                       "outcome_advantages": outcome_adv, "process_advantages": process_adv})
        self._process_metrics = {
            "train/process_reward_mean": float(process[scored].mean()) if scored.any() else float("nan"),
            "train/process_advantage_abs_mean": float(process_adv[trained].abs().mean()) if trained.any()
            else float("nan"),
        }
        return inputs

    def step(self, groups: list[RolloutGroup], fresh: list[bool] | None = None) -> dict[str, float]:
        """Update the PRM on the batch's outcome labels, then GRPO's step with PRIME's advantages
        (computed by `build_inputs` from the updated PRM)."""
        start = time.perf_counter()
        prm_metrics = self.update_prm(groups)
        prm_results = self._prm_results
        metrics = super().step(groups, fresh)
        policy_updates = metrics["train/optimizer_steps"] + metrics["train/nonfinite_updates"]
        attempted = policy_updates + len(prm_results)
        skipped = metrics["train/nonfinite_updates"] + sum(not r.applied for r in prm_results)
        metrics.update(prm_metrics)
        metrics["train/nonfinite_updates"] = float(skipped)  # the policy's and the PRM's
        metrics["train/nonfinite_step"] = float(attempted > 0 and skipped == attempted)
        metrics.update(self._process_metrics)
        metrics["train/step_s"] = time.perf_counter() - start
        return metrics

    # ------------------------------------------------------------------------- checkpoints

    def extra_state(self) -> dict:
        """The PRM's weights (`prm.<key>`) and its AdamW state (`prm_opt.<i>.<key>`), as tensors."""
        state = {PRM_PREFIX + k: v.detach().clone() for k, v in self.prm.state_dict().items()}
        for index, values in self.prm_optimizer.state_dict()["state"].items():
            for key, value in values.items():
                tensor = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
                state[f"{PRM_OPT_PREFIX}{index}.{key}"] = tensor
        return state

    def load_extra_state(self, state: dict) -> None:
        weights = {k[len(PRM_PREFIX):]: v for k, v in state.items() if k.startswith(PRM_PREFIX)}
        if not weights:
            raise RuntimeError("the checkpoint has no PRM weights (prm.*): it was not written by the PRIME learner")
        with torch.no_grad():  # in place: the PRM optimiser keeps pointing at these parameters
            self.prm.load_state_dict(weights, strict=True)
        optimizer_state: dict[int, dict] = {}
        for key, value in state.items():
            if key.startswith(PRM_OPT_PREFIX):
                index, name = key[len(PRM_OPT_PREFIX):].split(".", 1)
                optimizer_state.setdefault(int(index), {})[name] = value
        param_groups = self.prm_optimizer.state_dict()["param_groups"]
        count = sum(len(g["params"]) for g in param_groups)
        if any(i >= count for i in optimizer_state):
            raise RuntimeError(f"the checkpoint's PRM optimiser state names parameter {max(optimizer_state)} but the "
                               f"PRM has {count}")
        self.prm_optimizer.load_state_dict({"state": optimizer_state, "param_groups": param_groups})
