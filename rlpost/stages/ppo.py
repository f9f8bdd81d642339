"""The PPO stage: the GRPO stage's asynchronous vLLM rollouts and isolated rewards, trained by PPO
with a value model and GAE (`rlpost.learners.ppo.PPOLearner`, TRL's clipped policy loss).

Keys shared with the GRPO stage keep their names and meaning there (TRL GRPOConfig's where TRL has
them: `num_generations`, `max_completion_length`, `epsilon`, `beta`, `vllm_importance_sampling_cap`,
`save_steps`, `eval_steps`); PPO's own keys carry the names of TRL's former PPOConfig (`gamma`, `lam`,
`kl_coef`, `vf_coef`, `cliprange_value`, `num_ppo_epochs`, `num_mini_batches`), plus
`whiten_advantages`, `value_model` and `vf_lr`. The loop is `rlpost.loop.run_rl`; this module turns
the keys into its settings and the learner.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.config import setting
from rlpost.errors import UserError
from rlpost.lora import LoraSection
from rlpost.recipe import where
from rlpost.stages.rollout_stage import check_rollout_context


@dataclass
class PPOStage:
    max_steps: int = setting(100, "rollout batches to train on; each makes num_ppo_epochs x num_mini_batches "
                                  "optimiser steps")
    learning_rate: float = setting(1e-4, "AdamW learning rate of the policy, constant")
    vf_lr: float | None = setting(None, "AdamW learning rate of the value head (and separate value model); "
                                        "default: learning_rate")
    num_generations: int = setting(4, "samples per prompt (PPO needs no groups; the rollout stream makes them)")
    prompts_per_step: int = setting(8, "prompts per rollout batch, i.e. per step (completions = prompts x "
                                       "num_generations)")
    temperature: float = setting(1.0, "TRL GRPOConfig: sampling temperature of rollouts (> 0)")
    max_completion_length: int = setting(6, "TRL GRPOConfig: completion budget in tokens")
    max_staleness: int = setting(1, "policy versions a sample may lag the learner (0 = on-policy, synchronous)")
    rewards: list = setting(["arithmetic_exact"], "reward functions: names, dotted paths or "
                                                  "{name, weight, timeout_s, args}; the total is the outcome "
                                                  "reward on a completion's last token")
    reward_workers: int = setting(2, "processes scoring rewards")
    save_steps: int = setting(25, "TRL GRPOConfig: checkpoint every N steps")
    eval_steps: int = setting(25, "TRL GRPOConfig: evaluate the first `eval` entry every N steps")
    epsilon: float = setting(0.2, "TRL GRPOConfig: clipping range of the policy ratio, [1 - epsilon, 1 + epsilon]")
    beta: float = setting(0.0, "TRL GRPOConfig: coefficient of the KL to the stage's starting policy in the "
                               "loss (k3 estimator, as GRPO)")
    kl_coef: float = setting(0.0, "TRL PPOConfig: coefficient of the KL to the stage's starting policy in the "
                                  "per-token reward (k1 estimator, InstructGPT-style)")
    gamma: float = setting(1.0, "TRL PPOConfig: discount factor over completion tokens, in [0, 1]")
    lam: float = setting(0.95, "TRL PPOConfig: GAE lambda, in [0, 1] (1: Monte-Carlo returns, 0: one-step TD)")
    vf_coef: float = setting(0.1, "TRL PPOConfig: weight of the value loss in the total loss")
    cliprange_value: float = setting(0.2, "TRL PPOConfig: values move at most this far from the batch's old "
                                          "values in the clipped value loss")
    num_ppo_epochs: int = setting(4, "TRL PPOConfig: passes over each rollout batch")
    num_mini_batches: int = setting(1, "TRL PPOConfig: mini-batches (shuffled completions) per pass, one optimiser "
                                       "step each; at most prompts_per_step x num_generations")
    whiten_advantages: bool = setting(True, "standardise the advantages over each rollout batch's tokens")
    value_model: str = setting("head", "'head': a linear value head on the policy's backbone (shared, trained by "
                                       "both losses); 'separate': a copy of the starting policy's backbone with "
                                       "its own head", choices=("head", "separate"))
    max_grad_norm: float = setting(1.0, "TRL GRPOConfig: gradient clipping (policy and value model together)")
    vllm_importance_sampling_cap: float = setting(2.0, "TRL GRPOConfig: truncation of sampler importance weights")
    lora: LoraSection | None = setting(None, "train LoRA adapters instead of all weights: {r, alpha, dropout, "
                                             "target_modules, sync} (rlpost/lora.py); none: full fine-tuning")


def _fail(recipe, name: str, key: str, message: str) -> UserError:
    return UserError(f"{where(recipe, f'{name}.{key}')}: key '{name}.{key}' {message}")


def check_ppo(cfg: PPOStage, recipe, name: str) -> None:
    import math

    for key in ("max_steps", "save_steps", "eval_steps", "prompts_per_step", "num_generations",
                "max_completion_length", "reward_workers", "num_ppo_epochs", "num_mini_batches"):
        if getattr(cfg, key) < 1:
            raise _fail(recipe, name, key, f"must be >= 1, got {getattr(cfg, key)}")
    rows = cfg.prompts_per_step * cfg.num_generations
    if cfg.num_mini_batches > rows:
        raise _fail(recipe, name, "num_mini_batches", f"({cfg.num_mini_batches}) must be at most the completions "
                                                     f"per step, prompts_per_step x num_generations = {rows}")
    if cfg.max_staleness < 0:
        raise _fail(recipe, name, "max_staleness", f"must be >= 0 (0 = synchronous), got {cfg.max_staleness}")
    positive = ("learning_rate", "temperature", "epsilon", "vf_coef", "cliprange_value", "max_grad_norm")
    for key in positive + ("vf_lr",):
        value = getattr(cfg, key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise _fail(recipe, name, key, f"must be a number > 0, got {value}")
    for key in ("beta", "kl_coef"):
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) >= 0):
            raise _fail(recipe, name, key, f"must be >= 0 (0: no KL term), got {getattr(cfg, key)}")
    for key in ("gamma", "lam"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise _fail(recipe, name, key, f"must be in [0, 1], got {getattr(cfg, key)}")
    if not cfg.vllm_importance_sampling_cap >= 1:
        raise _fail(recipe, name, "vllm_importance_sampling_cap", f"must be >= 1, got {cfg.vllm_importance_sampling_cap}")
    check_rollout_context(cfg, recipe, name)


def ppo_settings(cfg: PPOStage, seed: int):
    from rlpost.learners.ppo import PPOSettings

    return PPOSettings(learning_rate=cfg.learning_rate, vf_lr=cfg.vf_lr, beta=cfg.beta, kl_coef=cfg.kl_coef,
                       epsilon=cfg.epsilon, gamma=cfg.gamma, lam=cfg.lam, vf_coef=cfg.vf_coef,
                       cliprange_value=cfg.cliprange_value, num_ppo_epochs=cfg.num_ppo_epochs,
                       num_mini_batches=cfg.num_mini_batches, whiten_advantages=cfg.whiten_advantages,
                       value_model=cfg.value_model, max_grad_norm=cfg.max_grad_norm,
                       importance_cap=cfg.vllm_importance_sampling_cap,
                       max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, seed=seed)


def run_ppo(cfg: PPOStage, ctx) -> dict:
    from rlpost.learners.ppo import PPOLearner
    from rlpost.stages.rollout_stage import run_on_rollouts

    m = ctx.recipe.model
    settings = ppo_settings(cfg, ctx.recipe.seed)

    def load_value_backbone():  # the stage's starting policy's backbone; a resume restores its trained weights
        import torch
        from transformers import AutoModel

        return AutoModel.from_pretrained(ctx.policy_in, dtype=getattr(torch, m.dtype)).to(ctx.device)

    def learner_factory(model, tokenizer, load_reference):
        return PPOLearner(model, tokenizer, settings, str(ctx.out_dir / "trl"),
                          reference_model=load_reference() if cfg.kl_coef > 0 or cfg.beta > 0 else None,
                          value_backbone=load_value_backbone() if cfg.value_model == "separate" else None)

    return run_on_rollouts(cfg, ctx, learner_factory=learner_factory)
