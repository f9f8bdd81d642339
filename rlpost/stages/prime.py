"""The PRIME stage: the GRPO stage's asynchronous vLLM rollouts and TRL's GRPO loss, with dense
per-token rewards from an implicit process reward model trained online on outcome labels
(`rlpost.learners.prime.PrimeLearner`; PRIME, Cui et al. 2025, arXiv:2502.01456).

The maths (derivations and the masking rules in rlpost/learners/prime.py). The PRM pi_phi starts
as a copy of the stage's starting policy, the reference pi_ref is a frozen copy of it; with
beta = `prm_beta`, the process reward of token t of completion y and the implicit outcome reward are

    r_t  = beta * ( log pi_phi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ),      r(y) = sum_t r_t

Each step, first the PRM takes `prm_steps` AdamW steps (`prm_learning_rate`) on the cross-entropy
against the outcome labels o_i = [r_o(y_i) >= outcome_threshold] of the samples that have a reward:

    L_PRM = -(1/N) sum_i [ o_i log sigma(r(y_i)) + (1 - o_i) log(1 - sigma(r(y_i))) ]

then, with the updated PRM, token t of sample i in a group with k valid samples V gets the advantage

    A_t^i = [ r_o(y^i) - (1/(k-1)) sum_{j in V, j != i} r_o(y^j) ]
          + process_reward_coef * sum_{s >= t} gamma^{s-t} [ r_s^i - (1/(k-1)) sum_{j in V, j != i} (1/|y^j|) sum_u r_u^j ]

(0 for masked samples and for groups with k < 2), which replaces GRPO's per-sequence advantage in
TRL's clipped surrogate: loss_{i,t} = -min(rho A_t^i, clip(rho, 1 - eps_low, 1 + eps_high) A_t^i) * w
+ beta * KL_k3.

Keys shared with the GRPO stage keep their names and meaning there (TRL GRPOConfig's where TRL has
them); `advantage_estimator` and `scale_rewards` do not exist here (the advantages are PRIME's RLOO
form, unscaled). PRIME's own keys: `prm_beta`, `prm_learning_rate`, `prm_steps`,
`process_reward_coef`, `gamma`, `outcome_threshold`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlpost.config import setting
from rlpost.errors import UserError
from rlpost.lora import LoraSection
from rlpost.recipe import where
from rlpost.stages.grpo import check_grpo


@dataclass
class PrimeStage:
    max_steps: int = setting(100, "rollout batches to train on; each makes prm_steps PRM steps, then "
                                  "num_iterations x steps_per_generation policy optimiser steps")
    learning_rate: float = setting(1e-4, "TRL GRPOConfig: AdamW learning rate of the policy, constant")
    beta: float = setting(0.0, "TRL GRPOConfig: KL coefficient to the stage's starting policy (in the loss)")
    loss_type: str = setting("grpo", "TRL GRPOConfig: loss formulation and aggregation ('cispo', 'sapo' and 'luspo' "
                                     "as TRL defines them; 'luspo' needs importance_sampling_level 'sequence')",
                             choices=("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"))
    epsilon: float = setting(0.2, "TRL GRPOConfig: clipping range of the surrogate, ratio >= 1 - epsilon "
                                  "(and <= 1 + epsilon unless epsilon_high is set)")
    epsilon_high: float | None = setting(None, "TRL GRPOConfig: upper clipping range (default: epsilon); for "
                                               "loss_type 'cispo' the cap on the ratio itself (required, >= 1)")
    importance_sampling_level: str = setting("token", "TRL GRPOConfig: clip ratios per token, or one per completion "
                                                      "('sequence': GSPO)", choices=("token", "sequence"))
    num_iterations: int = setting(1, "TRL GRPOConfig: policy optimisation passes over each rollout batch (mu); "
                                     "pi_old, advantages and sampler weights stay fixed for the batch")
    steps_per_generation: int = setting(1, "TRL GRPOConfig: mini-batches (of whole groups) per rollout batch, one "
                                           "policy optimiser step each; must divide prompts_per_step")
    num_generations: int = setting(16, "TRL GRPOConfig: samples per prompt (the group; RLOO baselines need >= 2)")
    temperature: float = setting(1.0, "TRL GRPOConfig: sampling temperature of rollouts (> 0)")
    max_completion_length: int = setting(6, "TRL GRPOConfig: completion budget in tokens")
    max_grad_norm: float = setting(1.0, "TRL GRPOConfig: gradient clipping (policy and PRM, each on its own)")
    vllm_importance_sampling_cap: float = setting(2.0, "TRL GRPOConfig: truncation of sampler importance weights")
    save_steps: int = setting(25, "TRL GRPOConfig: checkpoint every N steps (the PRM and its optimiser too)")
    eval_steps: int = setting(25, "TRL GRPOConfig: evaluate the first `eval` entry every N steps")
    prompts_per_step: int = setting(8, "prompts per rollout batch, i.e. per step (completions = prompts x "
                                       "num_generations), split into steps_per_generation mini-batches")
    max_staleness: int = setting(1, "policy versions a sample may lag the learner (0 = on-policy, synchronous)")
    rewards: list = setting(["arithmetic_exact"], "reward functions (the outcome reward r_o): names, dotted paths "
                                                  "or {name, weight, timeout_s, args}")
    reward_workers: int = setting(2, "processes scoring rewards")
    lora: LoraSection | None = setting(None, "train LoRA adapters on the policy instead of all weights: {r, alpha, "
                                             "dropout, target_modules, sync} (rlpost/lora.py); none: full "
                                             "fine-tuning. The PRM always trains all its weights")
    prm_beta: float = setting(0.05, "PRIME: scale of the implicit PRM, r_t = prm_beta * (log pi_phi - log pi_ref) "
                                    "(> 0; PRIME's 0.05)")
    prm_learning_rate: float = setting(1e-3, "PRIME: AdamW learning rate of the PRM, constant. PRIME uses 1e-6 on 7B "
                                             "models; prm_beta = 0.05 needs sum_t l_t of ~20 nats for |r(y)| ~ 1, "
                                             "and on a model of the quickstart's shape (256 wide, 2 layers) 1e-3 fits "
                                             "a fixed batch's 12 labels in ~12 steps where 1e-4 only lowers the loss "
                                             "from 0.69 to 0.62 in 15 (3e-3 is noisier); lower it for larger models")
    prm_steps: int = setting(1, "PRIME: PRM AdamW steps on each rollout batch's outcome labels, before its process "
                                "rewards are computed")
    process_reward_coef: float = setting(1.0, "PRIME: weight of the process return in the advantage (>= 0; 0: "
                                              "outcome RLOO only, the PRM is still trained)")
    gamma: float = setting(1.0, "PRIME: discount of the process rewards over completion tokens, in [0, 1]")
    outcome_threshold: float = setting(0.5, "PRIME: a sample's PRM label is 1 when its outcome reward is >= this, "
                                            "else 0")


def _fail(recipe, name: str, key: str, message: str) -> UserError:
    return UserError(f"{where(recipe, f'{name}.{key}')}: key '{name}.{key}' {message}")


def check_prime(cfg: PrimeStage, recipe, name: str) -> None:
    if cfg.prm_steps < 1:
        raise _fail(recipe, name, "prm_steps", f"must be >= 1, got {cfg.prm_steps}")
    for key in ("prm_beta", "prm_learning_rate"):
        value = getattr(cfg, key)
        if not (math.isfinite(value) and value > 0):
            raise _fail(recipe, name, key, f"must be a number > 0, got {value}")
    if not (math.isfinite(cfg.process_reward_coef) and cfg.process_reward_coef >= 0):
        raise _fail(recipe, name, "process_reward_coef", f"must be >= 0 (0: outcome advantages only), got "
                                                         f"{cfg.process_reward_coef}")
    if not 0 <= cfg.gamma <= 1:
        raise _fail(recipe, name, "gamma", f"must be in [0, 1], got {cfg.gamma}")
    if not math.isfinite(cfg.outcome_threshold):
        raise _fail(recipe, name, "outcome_threshold", f"must be a finite number, got {cfg.outcome_threshold}")
    check_grpo(cfg, recipe, name)  # the GRPO stage's keys, with its rules


def prime_settings(cfg: PrimeStage, seed: int):
    """(LearnerSettings, PrimeSettings) from the stage's keys."""
    from rlpost.learners.grpo import LearnerSettings
    from rlpost.learners.prime import PrimeSettings

    grpo = LearnerSettings(
        learning_rate=cfg.learning_rate, beta=cfg.beta, loss_type=cfg.loss_type, epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high, importance_sampling_level=cfg.importance_sampling_level,
        num_iterations=cfg.num_iterations, steps_per_generation=cfg.steps_per_generation,
        max_grad_norm=cfg.max_grad_norm, importance_cap=cfg.vllm_importance_sampling_cap,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, seed=seed)
    prime = PrimeSettings(prm_beta=cfg.prm_beta, prm_learning_rate=cfg.prm_learning_rate, prm_steps=cfg.prm_steps,
                          process_reward_coef=cfg.process_reward_coef, gamma=cfg.gamma,
                          outcome_threshold=cfg.outcome_threshold)
    return grpo, prime


def run_prime(cfg: PrimeStage, ctx) -> dict:
    from rlpost.learners.prime import PrimeLearner
    from rlpost.stages.rollout_stage import run_on_rollouts

    grpo, prime = prime_settings(cfg, ctx.recipe.seed)

    def learner_factory(model, tokenizer, load_reference):
        # Both copies of the stage's starting policy (also after a resume: the checkpoint's extra
        # state then restores the trained PRM). The frozen one is the PRM's reference and, when
        # beta > 0, the KL term's.
        reference = load_reference()
        return PrimeLearner(model, tokenizer, grpo, prime, str(ctx.out_dir / "trl"), cfg.num_generations,
                            prm_model=load_reference(), prm_reference=reference,
                            reference_model=reference if cfg.beta > 0 else None)

    return run_on_rollouts(cfg, ctx, learner_factory=learner_factory)
