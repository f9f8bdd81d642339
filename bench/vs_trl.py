"""rlpost against TRL's own GRPOTrainer on the same task, from the same checkpoint, in one run.

    .venv/bin/python -m bench.vs_trl [--steps 100] [--eval-every 10] [--target 0.8] [--sft DIR]
                                     [--trl-generation transformers vllm] [--staleness 1]

Both sides start from the quickstart's SFT policy (trained once as bench/algorithms.py does, or
`--sft`), train on the quickstart task's prompts with the quickstart's GRPO batch shape and
hyperparameters (8 prompts x 16 samples, at most 6 tokens, temperature 1, lr 1e-4 constant, beta 0,
loss "grpo", group-scaled advantages, clip 0.2, grad norm 1, AdamW without weight decay) and the
same cores (the whole machine: TRL's process gets torch threads = cores; rlpost its recipe's
threads per process). TRL runs synchronously, generating with transformers (`--trl-generation
transformers`, TRL's default) or with vLLM colocated in its process (`vllm`), gradient
checkpointing off (its default on recomputes activations: slower at these sizes).

Held-out accuracy is the quickstart's eval entry (1,000 held-out prompts, greedy, 95% Wilson
interval) every `--eval-every` steps on both sides, with the same runner and a vLLM engine: rlpost
evaluates in the loop (`loop/step_wall_s` leaves that time out; it is `loop/eval_s`), TRL's policy is
saved every `--eval-every` steps (save time taken out) and evaluated after its run. Printed per
side: steps/s and samples/s over the training time, the training seconds to the first evaluation
at or above `--target`, the one-off start-up (rlpost: vLLM engines; TRL: trainer construction),
and rlpost's ratio to TRL for each. rlpost runs first (in its own processes), then each TRL run in
a spawned process that exits before the next starts. Figures go in docs/benchmarks.md with the command.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path

from bench.algorithms import from_policy, run_recipe, sft_policy, stage

PROMPTS, SAMPLES, MAX_TOKENS, LR = 8, 16, 6, 1.0e-4


def rlpost_side(policy: Path, root: Path, steps: int, eval_every: int, staleness: int) -> dict:
    grpo = stage("grpo", steps, staleness) | {"eval_steps": eval_every, "save_steps": steps}
    summary, wall = run_recipe(from_policy(policy, [grpo]), root / f"rlpost-stale{staleness}")
    rows = [json.loads(line) for line in (root / f"rlpost-stale{staleness}" / "grpo" / "metrics.jsonl")
            .read_text().splitlines()]
    trained, curve = 0.0, []
    for row in sorted((r for r in rows if r["step"] > 0), key=lambda r: r["step"]):
        trained += row["loop/step_wall_s"]  # without the step's evaluation (loop/eval_s)
        if "eval/accuracy" in row:
            curve.append((row["step"], trained, row["eval/accuracy"], row["eval/accuracy_low"], row["eval/accuracy_high"]))
    record = summary["stages"]["grpo"]
    return {"side": f"rlpost (max_staleness {staleness})", "steps": steps, "train_s": trained, "curve": curve,
            "startup_s": record["engine_startup_s"], "wall_s": wall}


def trl_side(policy: Path, root: Path, steps: int, eval_every: int, generation: str, threads: int) -> dict:
    """TRL's GRPOTrainer in this process; its policy saved every `eval_every` steps, evaluated afterwards."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.arithmetic import exact_match_reward
    from rlpost.recipe import load_recipe
    from rlpost.training_data import TrainingData

    out = root / f"trl-{generation}"
    done = out / "trl.json"
    if done.exists():
        return json.loads(done.read_text())
    torch.set_num_threads(threads)
    recipe = load_recipe(*_recipe_file(policy, root))
    prompts = TrainingData(recipe.data, recipe.seed).prompts()
    rows = [dict(zip(("prompt", "columns"), prompts.get(i))) for i in range(steps * PROMPTS)]
    dataset = Dataset.from_list([{"prompt": r["prompt"], **r["columns"]} for r in rows])

    class Clock(TrainerCallback):
        """Training seconds per step, without the time spent saving the policy for evaluation."""

        def __init__(self):
            self.start, self.excluded, self.saved = None, 0.0, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % eval_every == 0 or state.global_step == steps:
                now = time.perf_counter()
                self.saved.append((state.global_step, now - self.start - self.excluded))
                model.save_pretrained(out / f"step-{state.global_step}")
                tokenizer.save_pretrained(out / f"step-{state.global_step}")  # the evaluation reads it
                self.excluded += time.perf_counter() - now

    start = time.perf_counter()
    config = GRPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=PROMPTS * SAMPLES,
        num_generations=SAMPLES, max_completion_length=MAX_TOKENS, temperature=1.0, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, beta=0.0, loss_type="grpo", scale_rewards="group",
        epsilon=0.2, max_grad_norm=1.0, weight_decay=0.0, gradient_accumulation_steps=1, use_cpu=not torch.cuda.is_available(), bf16=False,
        gradient_checkpointing=False, seed=0, report_to=[], save_strategy="no", logging_steps=10,
        disable_tqdm=True, dataloader_num_workers=0,
        **({"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": recipe.model.max_model_len or 64}
           if generation == "vllm" else {}))
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_match_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[clock])
    startup = time.perf_counter() - start
    trainer.train()
    train_s = clock.saved[-1][1]
    del trainer, model
    curve = [(step, t, *_evaluate(recipe, out / f"step-{step}")) for step, t in clock.saved]
    result = {"side": f"TRL GRPOTrainer ({generation} generation)", "steps": steps, "train_s": train_s,
              "curve": curve, "startup_s": startup, "wall_s": time.perf_counter() - start}
    done.write_text(json.dumps(result))
    return result


def _recipe_file(policy: Path, root: Path) -> tuple[str, list[str]]:
    import yaml

    path = root / "vs-trl-recipe.yaml"
    recipe = from_policy(policy, [stage("grpo", 1, 0)]) | {"run_dir": str(root / "unused")}  # its data and eval
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path), []


_ENGINE = {}


def _evaluate(recipe, policy_dir: Path) -> tuple[float, float, float]:
    """The quickstart's eval entry on `policy_dir` with one vLLM engine for all checkpoints."""
    from rlpost.pipeline import engine_settings, in_stage_evaluation
    from rlpost.training_data import TrainingData
    from rollouts.engine import RolloutEngine

    if "engine" not in _ENGINE:
        _ENGINE["engine"] = RolloutEngine(policy_dir, engine_settings(recipe))
    engine = _ENGINE["engine"]
    engine.reload_weights(policy_dir)
    result = in_stage_evaluation(recipe, TrainingData(recipe.data, recipe.seed), policy_dir)(engine, policy_dir.name)
    return result["accuracy"], result["low"], result["high"]


def time_to(curve: list, target: float) -> float | None:
    return next((t for _, t, acc, *_ in curve if acc >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.8, help="held-out accuracy to reach")
    parser.add_argument("--staleness", type=int, nargs="+", default=[1])
    parser.add_argument("--trl-generation", nargs="+", default=["transformers"], choices=("transformers", "vllm"))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="TRL's torch threads (default: all cores)")
    parser.add_argument("--root", type=Path, default=Path("runs/vs_trl"))
    parser.add_argument("--sft", type=Path, help="start from this policy directory instead of training SFT")
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    policy = sft_policy(root, args.sft)
    # rlpost first (its own processes), then each TRL run in a spawned process of its own (training,
    # then evaluating its checkpoints), so that nothing of one side is left running beside the other
    sides = [rlpost_side(policy, root, args.steps, args.eval_every, s) for s in args.staleness]
    for generation in args.trl_generation:
        child = multiprocessing.get_context("spawn").Process(
            target=trl_side, args=(policy, root, args.steps, args.eval_every, generation, args.threads))
        child.start()
        child.join()
        if child.exitcode != 0:  # recorded, not fatal: the other sides still compare
            print(f"the TRL run with {generation} generation failed (exit code {child.exitcode}; error above)")
            continue
        sides.append(json.loads((root / f"trl-{generation}" / "trl.json").read_text()))
    sides = sides[len(args.staleness):] + sides[:len(args.staleness)]  # TRL first in the table: the peer
    if len(sides) == len(args.staleness):
        raise SystemExit("no TRL run finished: nothing to compare with")
    (root / "vs_trl.json").write_text(json.dumps(sides, indent=1))
    peer = sides[0]
    print(f"\n{args.steps} GRPO steps x {PROMPTS} prompts x {SAMPLES} samples from {policy}; {os.cpu_count()} cores; "
          f"target {100 * args.target:.0f}% held-out; ratios: rlpost against {peer['side']}\n")
    print("| side | steps/s | samples/s | s to target | held-out at the end | start-up s | "
          "steps/s ratio | time-to-target ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for side in sides:
        rate = side["steps"] / side["train_s"]
        reach, last = time_to(side["curve"], args.target), side["curve"][-1]
        peer_reach = time_to(peer["curve"], args.target)
        speed = rate / (peer["steps"] / peer["train_s"])
        ratio = f"{peer_reach / reach:.2f}x" if reach and peer_reach else "n/a"
        print(f"| {side['side']} | {rate:.2f} | {rate * PROMPTS * SAMPLES:.0f} | "
              f"{'not reached' if reach is None else f'{reach:.1f}'} | {100 * last[2]:.1f}% [{100 * last[3]:.1f}, "
              f"{100 * last[4]:.1f}] | {side['startup_s']:.1f} | {speed:.2f}x | {ratio} |")
    for side in sides:
        print(f"{side['side']}: " + ", ".join(f"step {s} {t:.1f}s {100 * a:.1f}%" for s, t, a, *_ in side["curve"]))


if __name__ == "__main__":
    main()
