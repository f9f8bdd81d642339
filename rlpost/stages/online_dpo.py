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
from rlpost.lora import LoraSection
from rlpost.recipe import where
from rlpost.stages.rollout_stage import check_rollout_context

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
    lora: LoraSection | None = setting(None, "train LoRA adapters instead of all weights: {r, alpha, dropout, "
                                             "target_modules, sync} (rlpost/lora.py); none: full fine-tuning")


def check_online_dpo(cfg: OnlineDPOStage, recipe, name: str) -> None:
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
    check_rollout_context(cfg, recipe, name)


def run_online_dpo(cfg: OnlineDPOStage, ctx) -> dict:
    from rlpost.learners.online_dpo import OnlineDPOLearner, OnlineDPOSettings
    from rlpost.stages.rollout_stage import run_on_rollouts

    settings = OnlineDPOSettings(learning_rate=cfg.learning_rate, beta=cfg.beta, loss_type=cfg.loss_type,
                                 max_grad_norm=cfg.max_grad_norm, temperature=cfg.temperature, seed=ctx.recipe.seed)
    trl_dir = str(ctx.out_dir / "trl")

    def learner_factory(model, tokenizer, load_reference):
        return OnlineDPOLearner(model, tokenizer, load_reference(), settings, output_dir=trl_dir)

    return run_on_rollouts(cfg, ctx, learner_factory=learner_factory)
