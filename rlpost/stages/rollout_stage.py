"""What every stage that learns from the asynchronous rollout stream shares (grpo, online_dpo, ppo, prime).

Those stages have the same rollout keys (`max_steps`, `num_generations`, `prompts_per_step`,
`temperature`, `max_completion_length`, `max_staleness`, `rewards`, `reward_workers`, `save_steps`,
`eval_steps`) and differ only in their learner. `check_rollout_context` checks what those keys must
satisfy against the rest of the recipe; `run_on_rollouts` starts the rollout worker and the loop
(`rlpost.loop.run_rl`) with the stage's learner and returns the stage's figures.
"""

from __future__ import annotations

from rlpost.errors import UserError
from rlpost.recipe import where


def check_rollout_context(cfg, recipe, name: str, prompts_key: str = "prompts_per_step") -> None:
    """Rewards resolve, the task has enough prompts for `cfg.<prompts_key>`, and a prompt fits beside
    the completion budget (also used by the rejection stage, which samples prompts per round)."""
    from rewards.registry import parse_reward_specs, resolve

    try:
        for spec in parse_reward_specs(cfg.rewards):
            resolve(spec.name)
    except UserError as exc:
        raise UserError(f"{where(recipe, f'{name}.rewards')}: key '{name}.rewards': {exc}") from None
    if recipe.data.source == "task":
        from rlpost.training_data import TrainingData

        pool = TrainingData(recipe.data, recipe.seed).pool_size()
        wanted = getattr(cfg, prompts_key)
        if wanted > pool:
            raise UserError(f"{where(recipe, f'{name}.{prompts_key}')}: key '{name}.{prompts_key}' is "
                            f"{wanted} but the task has {pool} training prompts")
    limit = recipe.model.max_model_len or (recipe.model.build.max_positions if recipe.model.build else None)
    if limit and cfg.max_completion_length >= limit:
        raise UserError(f"{where(recipe, f'{name}.max_completion_length')}: '{name}.max_completion_length' "
                        f"({cfg.max_completion_length}) leaves no room for a prompt within max_model_len {limit}; "
                        f"raise model.max_model_len or lower it")


def run_on_rollouts(cfg, ctx, *, learner_factory=None, grpo_settings=None) -> dict:
    """Run the loop on the stage's rollout keys with `learner_factory` (or GRPO with `grpo_settings`)."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from rewards.registry import parse_reward_specs
    from rlpost.loop import LoopSettings, run_rl
    from rlpost.report import rl_stage_figures
    from rollouts.worker import WorkerSpec

    m = ctx.recipe.model
    tokenizer = AutoTokenizer.from_pretrained(ctx.policy_in)
    worker = WorkerSpec(model_dir=str(ctx.policy_in), prompts=ctx.data.prompts(), prompt_format=ctx.data.format,
                        rewards=parse_reward_specs(cfg.rewards), group_size=cfg.num_generations,
                        groups_per_batch=cfg.prompts_per_step, temperature=cfg.temperature,
                        max_tokens=cfg.max_completion_length, max_staleness=cfg.max_staleness,
                        reward_workers=cfg.reward_workers, torch_threads=m.threads, engine=ctx.engine_settings)
    settings = LoopSettings(max_steps=cfg.max_steps, groups_per_step=cfg.prompts_per_step,
                            max_staleness=cfg.max_staleness, checkpoint_every=cfg.save_steps,
                            eval_every=cfg.eval_steps, learner_threads=m.learner_threads or m.threads, device=ctx.device, dtype=m.dtype,
                            lora=getattr(cfg, "lora", None), workers=ctx.recipe.rollout.workers,
                            backend=ctx.recipe.rollout.backend, max_restarts=ctx.recipe.rollout.max_restarts,
                            weight_transport=ctx.recipe.rollout.weight_transport, ray_address=ctx.recipe.ray.address,
                            ray_cpus_per_worker=ctx.recipe.ray.cpus_per_worker)
    if grpo_settings is not None:
        settings.learner = grpo_settings
    with tqdm(total=cfg.max_steps, desc=f"{ctx.name} steps", unit="step") as bar:
        figures = run_rl(ctx.policy_in, ctx.out_dir, tokenizer, worker, settings, ctx.evaluate, progress=bar,
                         learner_factory=learner_factory, dist=ctx.dist)
    return rl_stage_figures(ctx.out_dir, figures)
