"""Time per RL step, synchronous vs asynchronous, on the quickstart model, measured in one run.

    python -m bench.async_pipeline [--steps 40] [--policy DIR]

Runs the real loop (vLLM rollout worker, reward processes, TRL GRPO learner, weight sync) twice
from the same policy: `max_staleness=0` (generate, then train) and `max_staleness=1` (generation
of batch b+1 overlaps training on batch b). For each mode it prints the median wall time per step
and the medians of the two parts measured in that same run:

    gen   = rollout worker's time for one batch (generate + score)
    train = learner's time for one update (TRL loss + backward + optimiser + weight publish)

and the ratio step / max(gen, train). Synchronous training cannot beat gen + train; the target
for asynchronous training is a ratio <= 1.15. The first `--warmup` steps of each mode are excluded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path


RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def _recipe():
    from rlpost.recipe import load_recipe

    return load_recipe(RECIPE)


def _quickstart_policy(directory: Path) -> Path:
    """The quickstart's SFT policy if one exists, else a freshly initialised model of the recipe's shape."""
    existing = Path("runs/quickstart/sft/policy")
    if (existing / "model.safetensors").exists():
        return existing
    from rlpost.modeling import ModelShape, build_model, build_tokenizer, save_pretrained

    recipe = _recipe()
    b = recipe.model.build
    tok = build_tokenizer()
    shape = ModelShape(b.hidden_size, b.num_layers, b.num_heads, b.num_kv_heads, b.intermediate_size,
                       b.max_positions, b.dropout)
    return save_pretrained(build_model(tok, shape, seed=recipe.seed), tok, directory / "policy")


def run_mode(policy: Path, work: Path, staleness: int, steps: int) -> list[dict]:
    """The quickstart recipe's grpo stage from `policy`, with `max_staleness=staleness`, no evaluation."""
    from transformers import AutoTokenizer

    from rewards.registry import parse_reward_specs
    from rlpost.learners.grpo import LearnerSettings
    from rlpost.loop import LoopSettings, run_rl
    from rlpost.pipeline import engine_settings, resolve_device
    from rlpost.training_data import TrainingData
    from rollouts.worker import WorkerSpec

    recipe = _recipe()
    g, m = recipe.grpo, recipe.model
    data = TrainingData(recipe.data, recipe.seed)
    run_dir = work / f"staleness-{staleness}"
    worker = WorkerSpec(model_dir=str(policy), prompts=data.prompts(), prompt_format=data.format,
                        rewards=parse_reward_specs(g.rewards), group_size=g.num_generations,
                        groups_per_batch=g.prompts_per_step, temperature=g.temperature,
                        max_tokens=g.max_completion_length, max_staleness=staleness, reward_workers=1,
                        torch_threads=m.threads, engine=engine_settings(recipe))
    settings = LoopSettings(
        max_steps=steps, groups_per_step=g.prompts_per_step, max_staleness=staleness,
        checkpoint_every=10**9, eval_every=10**9, learner_threads=m.threads, device=resolve_device(m.device),
        learner=LearnerSettings(learning_rate=g.learning_rate, beta=g.beta, loss_type=g.loss_type,
                                epsilon=g.epsilon, max_grad_norm=g.max_grad_norm,
                                importance_cap=g.vllm_importance_sampling_cap, scale_rewards=g.scale_rewards,
                                max_completion_length=g.max_completion_length, temperature=g.temperature,
                                seed=recipe.seed),
    )
    tokenizer = AutoTokenizer.from_pretrained(policy)
    run_rl(policy, run_dir, tokenizer, worker, settings)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarize(rows: list[dict], warmup: int) -> dict:
    steady = [r for r in rows if r["step"] > warmup]
    median = lambda key: statistics.median(r[key] for r in steady if key in r)  # noqa: E731
    step, gen, train = median("loop/step_wall_s"), median("rollout/batch_s"), median("learner/update_s")
    return {"steps": len(steady), "step_s": step, "gen_s": gen, "train_s": train,
            "ratio_to_max": step / max(gen, train), "ratio_to_sum": step / (gen + train)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--policy", type=Path, help="policy directory (default: quickstart SFT policy or fresh model)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rlpost-bench-"))
    try:
        policy = args.policy or _quickstart_policy(work)
        results = {mode: summarize(run_mode(policy, work, staleness, args.steps), args.warmup)
                   for mode, staleness in (("sync", 0), ("async", 1))}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"policy: {policy}; {args.steps} steps per mode, first {args.warmup} excluded; medians")
    print(f"{'mode':<6} {'step s':>8} {'gen s':>8} {'train s':>8} {'step/max(gen,train)':>20} {'step/(gen+train)':>17}")
    for mode, r in results.items():
        print(f"{mode:<6} {r['step_s']:8.3f} {r['gen_s']:8.3f} {r['train_s']:8.3f} {r['ratio_to_max']:20.2f} "
              f"{r['ratio_to_sum']:17.2f}")
    print(f"async speed-up over sync: {results['sync']['step_s'] / results['async']['step_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
