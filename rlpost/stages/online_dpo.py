"""The online DPO stage: asynchronous vLLM rollouts scored by isolated rewards, TRL's DPO loss on each
prompt's best and worst sample (`rlpost.learners.online_dpo`), against the stage's starting policy.

The rollout keys are the GRPO stage's (`num_generations` samples per prompt, `prompts_per_step`
prompts per step, `max_staleness`, `rewards`, ...), so the loop (`rlpost.loop.run_rl`) is the same:
staleness gate, weight sync, checkpoints, ledger. `beta` and `loss_type` are TRL DPOConfig's. Each
step trains on the pairs of one rollout batch: at most `prompts_per_step` (prompts whose valid
rewards all tie make none), one optimiser step; a batch without a pair takes no step.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.config import setting
from rlpost.errors import UserError
from rlpost.recipe import where

# rlpost.learners.online_dpo.LOSS_TYPES, repeated so that loading a recipe does not import torch
# (tests/test_online_dpo.py checks that the two agree).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
              "apo_down", "discopop", "sigmoid_norm")


@dataclass
class OnlineDPOStage:
    max_steps: int = setting(100, "rollout batches to train on, one optimiser step each (none for a batch "
                                  "without a pair)")
    learning_rate: float = setting(1e-4, "AdamW learning rate, constant (as TRL DPOConfig's learning_rate)")
    beta: float = setting(0.1, "TRL DPOConfig: strength of the pull to the reference (higher = closer); the "
                               "regularisation tau for 'ipo'")
    loss_type: str = setting("sigmoid", "TRL DPOConfig: 'sigmoid' is DPO; 'hinge' (SLiC), 'ipo', 'nca_pair', "
                                        "'bco_pair', 'sppo_hard', 'aot', 'aot_unpaired', 'apo_zero', 'apo_down', "
                                        "'discopop', 'sigmoid_norm' as TRL defines them", choices=LOSS_TYPES)
    num_generations: int = setting(8, "TRL GRPOConfig: samples per prompt; the best and worst by reward make the "
                                      "prompt's pair (>= 2)")
    prompts_per_step: int = setting(8, "prompts per rollout batch, i.e. per step (at most this many pairs)")
    temperature: float = setting(1.0, "TRL GRPOConfig: sampling temperature of rollouts (> 0); the DPO loss uses "
                                      "the policy's own (temperature 1) log-probabilities, as TRL's")
    max_completion_length: int = setting(6, "TRL GRPOConfig: completion budget in tokens")
    max_grad_norm: float = setting(1.0, "TRL DPOConfig: gradient clipping")
    max_staleness: int = setting(1, "policy versions a sample may lag the learner (0 = on-policy, synchronous)")
    rewards: list = setting(["arithmetic_exact"], "reward functions that rank each prompt's samples: names, "
                                                  "dotted paths or {name, weight, timeout_s, args}")
    reward_workers: int = setting(2, "processes scoring rewards")
    save_steps: int = setting(25, "checkpoint every N steps")
    eval_steps: int = setting(25, "evaluate the first `eval` entry every N steps")


def check_online_dpo(cfg: OnlineDPOStage, recipe, name: str) -> None:
    from rewards.registry import parse_reward_specs, resolve

    for key in ("max_steps", "save_steps", "eval_steps", "prompts_per_step", "max_completion_length",
                "reward_workers"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{where(recipe, f'{name}.{key}')}: key '{name}.{key}' must be >= 1, got {getattr(cfg, key)}")
    if cfg.num_generations < 2:
        raise UserError(f"{where(recipe, f'{name}.num_generations')}: key '{name}.num_generations' must be >= 2: a "
                        f"pair needs two samples of a prompt, got {cfg.num_generations}")
    if cfg.max_staleness < 0:
        raise UserError(f"{where(recipe, f'{name}.max_staleness')}: key '{name}.max_staleness' must be >= 0 "
                        f"(0 = synchronous), got {cfg.max_staleness}")
    if cfg.temperature <= 0:
        raise UserError(f"{where(recipe, f'{name}.temperature')}: key '{name}.temperature' must be > 0: greedy "
                        f"rollouts give identical samples and no pairs")
    for key in ("learning_rate", "beta", "max_grad_norm"):
        if not getattr(cfg, key) > 0:
            raise UserError(f"{where(recipe, f'{name}.{key}')}: key '{name}.{key}' must be > 0, got {getattr(cfg, key)}")
    if cfg.loss_type not in LOSS_TYPES:  # the config's `choices` catch this on load; kept for direct use
        raise UserError(f"{where(recipe, f'{name}.loss_type')}: key '{name}.loss_type' must be one of "
                        f"{', '.join(LOSS_TYPES)}, got {cfg.loss_type!r}")
    try:
        for spec in parse_reward_specs(cfg.rewards):
            resolve(spec.name)
    except UserError as exc:
        raise UserError(f"{where(recipe, f'{name}.rewards')}: key '{name}.rewards': {exc}") from None
    if recipe.data.source == "task":
        from rlpost.training_data import TrainingData

        pool = TrainingData(recipe.data, recipe.seed).pool_size()
        if cfg.prompts_per_step > pool:
            raise UserError(f"{where(recipe, f'{name}.prompts_per_step')}: key '{name}.prompts_per_step' is "
                            f"{cfg.prompts_per_step} but the task has {pool} training prompts")
    limit = recipe.model.max_model_len or (recipe.model.build.max_positions if recipe.model.build else None)
    if limit and cfg.max_completion_length >= limit:
        raise UserError(f"{where(recipe, f'{name}.max_completion_length')}: '{name}.max_completion_length' "
                        f"({cfg.max_completion_length}) leaves no room for a prompt within max_model_len {limit}; "
                        f"raise model.max_model_len or lower it")


def run_online_dpo(cfg: OnlineDPOStage, ctx) -> dict:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from rewards.registry import parse_reward_specs
    from rlpost.learners.online_dpo import OnlineDPOLearner, OnlineDPOSettings
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
    # LoopSettings.learner (GRPO's settings) is read only by the loop's default learner, not with a factory.
    settings = LoopSettings(
        max_steps=cfg.max_steps, groups_per_step=cfg.prompts_per_step, max_staleness=cfg.max_staleness,
        checkpoint_every=cfg.save_steps, eval_every=cfg.eval_steps, learner_threads=m.threads, device=ctx.device,
        dtype=m.dtype,
    )
    learner_settings = OnlineDPOSettings(learning_rate=cfg.learning_rate, beta=cfg.beta, loss_type=cfg.loss_type,
                                         max_grad_norm=cfg.max_grad_norm, temperature=cfg.temperature,
                                         seed=recipe.seed)
    trl_dir = str(ctx.out_dir / "trl")

    def learner_factory(model, tok, load_reference):
        return OnlineDPOLearner(model, tok, load_reference(), learner_settings, output_dir=trl_dir)

    with tqdm(total=cfg.max_steps, desc=f"{ctx.name} steps", unit="step") as bar:
        figures = run_rl(ctx.policy_in, ctx.out_dir, tokenizer, worker, settings, ctx.evaluate, progress=bar,
                         learner_factory=learner_factory)
    return rl_stage_figures(ctx.out_dir, figures)
