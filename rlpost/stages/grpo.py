"""The GRPO stage: asynchronous vLLM rollouts scored by isolated rewards, TRL's GRPO loss.

Keys carry TRL GRPOConfig's field names where TRL has the setting (`num_generations` is the group
size, `max_completion_length` the completion budget, `vllm_importance_sampling_cap` the truncation
of sampler importance weights, `save_steps`/`eval_steps` the checkpoint and evaluation intervals);
`prompts_per_step`, `max_staleness`, `rewards` and `reward_workers` are rlpost's own. The loop
itself is `rlpost.loop.run_rl`; this module turns recipe keys into its settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.config import setting
from rlpost.errors import UserError
from rlpost.lora import LoraSection
from rlpost.recipe import where
from rlpost.stages.rollout_stage import check_rollout_context


@dataclass
class GRPOStage:
    max_steps: int = setting(100, "rollout batches to train on; each makes num_iterations x steps_per_generation "
                                  "optimiser steps (1 by default; TRL GRPOConfig's max_steps counts optimiser steps)")
    learning_rate: float = setting(1e-4, "TRL GRPOConfig: AdamW learning rate, constant")
    beta: float = setting(0.0, "TRL GRPOConfig: KL coefficient to the stage's starting policy")
    loss_type: str = setting("grpo", "TRL GRPOConfig: loss formulation and aggregation ('cispo', 'sapo' and 'luspo' "
                                     "as TRL defines them; 'luspo' needs importance_sampling_level 'sequence')",
                             choices=("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"))
    epsilon: float = setting(0.2, "TRL GRPOConfig: clipping range of the surrogate, ratio >= 1 - epsilon "
                                  "(and <= 1 + epsilon unless epsilon_high is set)")
    epsilon_high: float | None = setting(None, "TRL GRPOConfig: upper clipping range, ratio <= 1 + epsilon_high "
                                               "(DAPO recommends 0.28; default: epsilon); for loss_type 'cispo' the "
                                               "cap on the ratio itself (required there, TRL recommends 5.0)")
    importance_sampling_level: str = setting("token", "TRL GRPOConfig: clip ratios per token, or one per completion "
                                                      "from its mean token log-ratio ('sequence': GSPO)",
                                             choices=("token", "sequence"))
    num_iterations: int = setting(1, "TRL GRPOConfig: optimisation passes over each rollout batch (mu); pi_old, "
                                     "advantages and sampler weights stay those from before the batch's first update")
    steps_per_generation: int = setting(1, "TRL GRPOConfig: mini-batches (of whole groups) per rollout batch, one "
                                           "optimiser step each; must divide prompts_per_step")
    num_generations: int = setting(16, "TRL GRPOConfig: samples per prompt (the group)")
    temperature: float = setting(1.0, "TRL GRPOConfig: sampling temperature of rollouts (> 0)")
    max_completion_length: int = setting(6, "TRL GRPOConfig: completion budget in tokens")
    scale_rewards: str = setting("group", "TRL GRPOConfig: advantage scaling (group std, or none as in Dr. GRPO)",
                                 choices=("group", "none"))
    advantage_estimator: str = setting("grpo", "'grpo': reward minus group mean, scaled per scale_rewards; 'rloo': "
                                               "reward minus the mean of the group's other samples (RLOO, "
                                               "unscaled as TRL RLOOTrainer's default; scale_rewards unused)",
                                       choices=("grpo", "rloo"))
    max_grad_norm: float = setting(1.0, "TRL GRPOConfig: gradient clipping")
    vllm_importance_sampling_cap: float = setting(2.0, "TRL GRPOConfig: truncation of sampler importance weights")
    save_steps: int = setting(25, "TRL GRPOConfig: checkpoint every N steps")
    eval_steps: int = setting(25, "TRL GRPOConfig: evaluate the first `eval` entry every N steps")
    prompts_per_step: int = setting(8, "prompts per rollout batch, i.e. per step (completions = prompts x "
                                       "num_generations), split into steps_per_generation mini-batches")
    max_staleness: int = setting(1, "policy versions a sample may lag the learner (0 = on-policy, synchronous)")
    rewards: list = setting(["arithmetic_exact"], "reward functions: names, dotted paths or "
                                                  "{name, weight, timeout_s, args}")
    reward_workers: int = setting(2, "processes scoring rewards")
    lora: LoraSection | None = setting(None, "train LoRA adapters instead of all weights: {r, alpha, dropout, "
                                             "target_modules, sync} (rlpost/lora.py); none: full fine-tuning")


def check_grpo(cfg: GRPOStage, recipe, name: str) -> None:
    for key in ("max_steps", "save_steps", "eval_steps", "prompts_per_step", "max_completion_length",
                "reward_workers", "num_iterations", "steps_per_generation"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{where(recipe, f'{name}.{key}')}: key '{name}.{key}' must be >= 1, got {getattr(cfg, key)}")
    if cfg.prompts_per_step % cfg.steps_per_generation:
        raise UserError(f"{where(recipe, f'{name}.steps_per_generation')}: key '{name}.steps_per_generation' "
                        f"({cfg.steps_per_generation}) must divide '{name}.prompts_per_step' ({cfg.prompts_per_step}): "
                        f"each mini-batch is a whole number of prompt groups")
    # TRL 1.16's rules (GRPOTrainer.__init__; the same as rlpost.learners.grpo.loss_level_conflict, kept
    # here so that loading a recipe does not import torch): at sequence level (GSPO) only the per-sequence
    # objectives; "luspo" is a sequence-level loss.
    per_sequence = ("grpo", "sapo", "luspo")
    if cfg.importance_sampling_level == "sequence" and cfg.loss_type not in per_sequence:
        raise UserError(f"{where(recipe, f'{name}.importance_sampling_level')}: keys '{name}.loss_type' "
                        f"({cfg.loss_type!r}) and '{name}.importance_sampling_level' ('sequence') do not go together: "
                        f"'{cfg.loss_type}' sums per-token terms, weighting each sequence by its length; use loss_type "
                        f"{', '.join(per_sequence)} or importance_sampling_level 'token'")
    if cfg.importance_sampling_level == "token" and cfg.loss_type == "luspo":
        raise UserError(f"{where(recipe, f'{name}.importance_sampling_level')}: keys '{name}.loss_type' ('luspo') and "
                        f"'{name}.importance_sampling_level' ('token') do not go together: 'luspo' is a sequence-level "
                        f"loss; set {name}.importance_sampling_level=sequence")
    if cfg.epsilon_high is not None and cfg.epsilon_high <= 0:
        raise UserError(f"{where(recipe, f'{name}.epsilon_high')}: key '{name}.epsilon_high' must be > 0 "
                        f"(or unset: = epsilon), got {cfg.epsilon_high}")
    if cfg.loss_type == "cispo" and (cfg.epsilon_high is None or cfg.epsilon_high < 1):
        raise UserError(f"{where(recipe, f'{name}.epsilon_high')}: loss_type 'cispo' caps the ratio at "
                        f"'{name}.epsilon_high' itself (not 1 + it), so it must be set and >= 1, got "
                        f"{cfg.epsilon_high} (TRL recommends 5.0; below 1 even on-policy tokens are scaled down)")
    if cfg.max_staleness < 0:
        raise UserError(f"{where(recipe, f'{name}.max_staleness')}: key '{name}.max_staleness' must be >= 0 (0 = synchronous), got {cfg.max_staleness}")
    if cfg.num_generations < 2:
        raise UserError(f"{where(recipe, f'{name}.num_generations')}: key '{name}.num_generations' must be >= 2: a group of one sample has no "
                        f"baseline, so every advantage is 0")
    if cfg.temperature <= 0:
        raise UserError(f"{where(recipe, f'{name}.temperature')}: key '{name}.temperature' must be > 0: greedy rollouts give identical samples "
                        f"and no learning signal")
    if cfg.learning_rate <= 0 or cfg.beta < 0 or cfg.epsilon <= 0 or cfg.vllm_importance_sampling_cap < 1:
        raise UserError(f"{where(recipe, name)}: stage '{name}' needs learning_rate > 0, beta >= 0, epsilon > 0 and "
                        f"vllm_importance_sampling_cap >= 1")
    check_rollout_context(cfg, recipe, name)


def run_grpo(cfg: GRPOStage, ctx) -> dict:
    from rlpost.learners.grpo import LearnerSettings
    from rlpost.stages.rollout_stage import run_on_rollouts

    settings = LearnerSettings(
        learning_rate=cfg.learning_rate, beta=cfg.beta, loss_type=cfg.loss_type, epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high, importance_sampling_level=cfg.importance_sampling_level,
        num_iterations=cfg.num_iterations, steps_per_generation=cfg.steps_per_generation,
        max_grad_norm=cfg.max_grad_norm, importance_cap=cfg.vllm_importance_sampling_cap,
        scale_rewards=cfg.scale_rewards, advantage_estimator=cfg.advantage_estimator,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, seed=ctx.recipe.seed)
    return run_on_rollouts(cfg, ctx, grpo_settings=settings)
