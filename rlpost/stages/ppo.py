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
from rlpost.recipe import where


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


def _fail(recipe, name: str, key: str, message: str) -> UserError:
    return UserError(f"{where(recipe, f'{name}.{key}')}: key '{name}.{key}' {message}")


def check_ppo(cfg: PPOStage, recipe, name: str) -> None:
    import math

    from rewards.registry import parse_reward_specs, resolve

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
    try:
        for spec in parse_reward_specs(cfg.rewards):
            resolve(spec.name)
    except UserError as exc:
        raise UserError(f"{where(recipe, f'{name}.rewards')}: key '{name}.rewards': {exc}") from None
    if recipe.data.source == "task":
        from rlpost.training_data import TrainingData

        pool = TrainingData(recipe.data, recipe.seed).pool_size()
        if cfg.prompts_per_step > pool:
            raise _fail(recipe, name, "prompts_per_step", f"is {cfg.prompts_per_step} but the task has {pool} "
                                                         f"training prompts")
    limit = recipe.model.max_model_len or (recipe.model.build.max_positions if recipe.model.build else None)
    if limit and cfg.max_completion_length >= limit:
        raise _fail(recipe, name, "max_completion_length", f"({cfg.max_completion_length}) leaves no room for a "
                                                           f"prompt within max_model_len {limit}; raise "
                                                           f"model.max_model_len or lower it")


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
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from rewards.registry import parse_reward_specs
    from rlpost.learners.ppo import PPOLearner
    from rlpost.loop import LoopSettings, run_rl
    from rlpost.report import rl_stage_figures
    from rollouts.worker import WorkerSpec

    recipe, m = ctx.recipe, ctx.recipe.model
    tokenizer = AutoTokenizer.from_pretrained(ctx.policy_in)
    worker = WorkerSpec(model_dir=str(ctx.policy_in), prompts=ctx.data.prompts(), prompt_format=ctx.data.format,
                        rewards=parse_reward_specs(cfg.rewards), group_size=cfg.num_generations,
                        groups_per_batch=cfg.prompts_per_step, temperature=cfg.temperature,
                        max_tokens=cfg.max_completion_length, max_staleness=cfg.max_staleness,
                        reward_workers=cfg.reward_workers, torch_threads=m.threads,
                        engine=ctx.engine_settings)
    settings = LoopSettings(
        max_steps=cfg.max_steps, groups_per_step=cfg.prompts_per_step, max_staleness=cfg.max_staleness,
        checkpoint_every=cfg.save_steps, eval_every=cfg.eval_steps, learner_threads=m.threads, device=ctx.device,
        dtype=m.dtype,
    )
    learner_settings = ppo_settings(cfg, recipe.seed)

    def load_value_backbone():  # the stage's starting policy's backbone; a resume restores its trained weights
        import torch
        from transformers import AutoModel

        return AutoModel.from_pretrained(ctx.policy_in, dtype=getattr(torch, m.dtype)).to(ctx.device)

    learner_factory = lambda model, tok, load_ref: PPOLearner(  # noqa: E731
        model, tok, learner_settings, str(ctx.out_dir / "trl"),
        reference_model=load_ref() if cfg.kl_coef > 0 or cfg.beta > 0 else None,
        value_backbone=load_value_backbone() if cfg.value_model == "separate" else None)
    with tqdm(total=cfg.max_steps, desc=f"{ctx.name} steps", unit="step") as bar:
        figures = run_rl(ctx.policy_in, ctx.out_dir, tokenizer, worker, settings, ctx.evaluate, progress=bar,
                         learner_factory=learner_factory)
    return rl_stage_figures(ctx.out_dir, figures)
