"""rlpost against TRL's own GRPOTrainer on the same task, from the same checkpoint, in one run.

    .venv/bin/python -m bench.vs_trl [--recipe recipes/quickstart.yaml] [--steps 100] [--eval-every 10]
                                     [--target 0.8] [--seeds 0 1 2] [--sft DIR] [--staleness 1]
                                     [--trl-generation transformers vllm]

The shape comes from a recipe: its model, task and evaluation, its SFT stage (trained once, seed 0,
into ROOT/sft, or `--sft`) and its GRPO stage's batch shape and hyperparameters (prompts per step,
samples per prompt, completion length, temperature, learning rate, beta). The quickstart's is
8 prompts x 16 samples of at most 6 tokens on a 2M model; recipes/counting.yaml is the
generation-heavy one (4 x 8 samples of 132 tokens after 22-token prompts, 21M parameters, an SFT
stage a CPU finishes in ~15 minutes), and recipes/counting_instructed.yaml the same with an instruction
before each problem (219-token prompts, filled in by the recipe's data.prompt template for both sides);
recipes/long_addition.yaml is generation-heavy with 256-token prompts, but its SFT takes hours on a
CPU. Both
sides train with that shape, lr constant, loss "grpo", group-scaled advantages, clip 0.2, grad norm 1,
AdamW without weight decay, on the same cores (the whole machine: TRL's process gets torch threads
= cores; rlpost its recipe's threads per process). TRL runs synchronously, generating with
transformers (`--trl-generation transformers`, TRL's default) or with vLLM colocated in its process
(`vllm`), gradient checkpointing off (its default on recomputes activations: slower at these sizes).

Every seed in `--seeds` runs every side (the RL seed: data order and sampling; the SFT checkpoint is
the same). Held-out accuracy is the recipe's first eval entry every `--eval-every` steps on both
sides, with the same runner and a vLLM engine: rlpost evaluates in the loop (`loop/step_wall_s`
leaves that time out; it is `loop/eval_s`), TRL's policy is saved every `--eval-every` steps (save
time taken out) and evaluated after its run. Printed per seed and side: steps/s and samples/s over
the training time, the training seconds to the first evaluation at or above `--target`, the one-off
start-up (rlpost: vLLM engines; TRL: trainer construction), and rlpost's ratio to TRL for each;
then each ratio over the seeds. rlpost runs first (in its own processes), then each TRL run in a
spawned process that exits before the next starts. Figures go in docs/benchmarks.md with the command.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.algorithms import REPO, from_policy, run_recipe, sft_policy


@dataclass(frozen=True)
class Shape:
    """What both sides train: a recipe's model, data, eval, SFT stage and GRPO stage."""

    recipe: dict

    @property
    def grpo(self) -> dict:
        return next(s for s in self.recipe["stages"] if s["type"] == "grpo")

    @property
    def prompts(self) -> int:
        return self.grpo["prompts_per_step"]

    @property
    def samples(self) -> int:
        return self.grpo["num_generations"]

    def from_policy(self, policy: Path, stages: list[dict], seed: int) -> dict:
        return from_policy(policy, stages, seed, full=self.recipe)

    def sft_policy(self, root: Path, given: Path | None) -> Path:
        return sft_policy(root, given, full=self.recipe)


def rlpost_side(shape: Shape, policy: Path, root: Path, steps: int, eval_every: int, staleness: int,
                seed: int) -> dict:
    grpo = shape.grpo | {"name": "grpo", "max_steps": steps, "max_staleness": staleness, "eval_steps": eval_every,
                         "save_steps": steps}
    run_dir = root / f"rlpost-stale{staleness}-seed{seed}"
    summary, wall = run_recipe(shape.from_policy(policy, [grpo], seed), run_dir)
    rows = [json.loads(line) for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    trained, curve = 0.0, []
    for row in sorted((r for r in rows if r["step"] > 0), key=lambda r: r["step"]):
        trained += row["loop/step_wall_s"]  # without the step's evaluation (loop/eval_s)
        if "eval/accuracy" in row:
            curve.append((row["step"], trained, row["eval/accuracy"], row["eval/accuracy_low"], row["eval/accuracy_high"]))
    record = summary["stages"]["grpo"]
    return {"side": f"rlpost (max_staleness {staleness})", "seed": seed, "steps": steps, "train_s": trained,
            "curve": curve, "startup_s": record["engine_startup_s"], "wall_s": wall}


def trl_side(shape: Shape, policy: Path, root: Path, steps: int, eval_every: int, generation: str, threads: int,
             seed: int) -> dict:
    """TRL's GRPOTrainer in this process; its policy saved every `eval_every` steps, evaluated afterwards."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.arithmetic import exact_match_reward
    from rlpost.recipe import load_recipe

    out = root / f"trl-{generation}-seed{seed}"
    done = out / "trl.json"
    if done.exists():
        return json.loads(done.read_text())
    torch.set_num_threads(threads)
    recipe = load_recipe(_recipe_file(shape, policy, root, seed))
    tokenizer = AutoTokenizer.from_pretrained(policy)
    dataset = Dataset.from_list(trl_rows(recipe, tokenizer, steps * shape.prompts))

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

    grpo = shape.grpo
    start = time.perf_counter()
    config = GRPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=shape.prompts * shape.samples,
        num_generations=shape.samples, max_completion_length=grpo["max_completion_length"],
        temperature=grpo["temperature"], learning_rate=grpo["learning_rate"], lr_scheduler_type="constant",
        warmup_steps=0, beta=grpo.get("beta", 0.0), loss_type="grpo", scale_rewards="group", epsilon=0.2,
        max_grad_norm=1.0, weight_decay=0.0, gradient_accumulation_steps=1, use_cpu=not torch.cuda.is_available(),
        bf16=False, gradient_checkpointing=False, seed=seed, report_to=[], save_strategy="no", logging_steps=10,
        disable_tqdm=True, dataloader_num_workers=0,
        **({"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": recipe.model.max_model_len or
            _context(recipe)} if generation == "vllm" else {}))
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_match_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[clock])
    startup = time.perf_counter() - start
    trainer.train()
    train_s = clock.saved[-1][1]
    del trainer, model
    curve = [(step, t, *_evaluate(recipe, out / f"step-{step}")) for step, t in clock.saved]
    result = {"side": f"TRL GRPOTrainer ({generation} generation)", "seed": seed, "steps": steps, "train_s": train_s,
              "curve": curve, "startup_s": startup, "wall_s": time.perf_counter() - start}
    done.write_text(json.dumps(result))
    return result


def trl_rows(recipe, tokenizer, count: int) -> list[dict]:
    """The first `count` prompts of rlpost's stream for `recipe` as TRL dataset rows: the text rlpost's
    sampler and learner see (the recipe's prompt format, data.prompt, applied) and the reward's columns."""
    from rlpost.training_data import TrainingData

    data = TrainingData(recipe.data, recipe.seed)
    rows = [{**columns, "prompt": prompt} for prompt, columns in map(data.prompts().get, range(count))]
    return [{**row, "prompt": data.format.text(tokenizer, row)} for row in rows]


def _recipe_file(shape: Shape, policy: Path, root: Path, seed: int) -> str:
    """A recipe file of the shape from `policy` (its data and eval; the stage is not run)."""
    path = root / f"vs-trl-recipe-seed{seed}.yaml"
    stage = shape.grpo | {"name": "grpo", "max_steps": 1}
    path.write_text(yaml.safe_dump(shape.from_policy(policy, [stage], seed) | {"run_dir": str(root / "unused")},
                                   sort_keys=False))
    return str(path)


def _context(recipe) -> int:
    from rlpost.pipeline import engine_settings

    return engine_settings(recipe).max_model_len


_ENGINE = {}


def _evaluate(recipe, policy_dir: Path) -> tuple[float, float, float]:
    """The recipe's eval entry on `policy_dir` with one vLLM engine for all checkpoints."""
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


def ratios(side: dict, peer: dict, target: float) -> tuple[float, float | None]:
    """(steps/s ratio, time-to-target ratio or None) of `side` against `peer`, both of one seed."""
    speed = (side["steps"] / side["train_s"]) / (peer["steps"] / peer["train_s"])
    reach, peer_reach = time_to(side["curve"], target), time_to(peer["curve"], target)
    return speed, (peer_reach / reach if reach and peer_reach else None)


def print_tables(shape: Shape, policy: Path, runs: dict[int, list[dict]], steps: int, target: float) -> None:
    per_step = shape.prompts * shape.samples
    print(f"\n{steps} GRPO steps x {shape.prompts} prompts x {shape.samples} samples "
          f"(at most {shape.grpo['max_completion_length']} tokens) from {policy}; {os.cpu_count()} cores; "
          f"target {100 * target:.0f}% held-out; ratios: rlpost against the first TRL side of the same seed\n")
    print("| seed | side | steps/s | samples/s | s to target | held-out at the end | start-up s | "
          "steps/s ratio | time-to-target ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed, sides in runs.items():
        peer = sides[0]
        for side in sides:
            rate = side["steps"] / side["train_s"]
            reach, last = time_to(side["curve"], target), side["curve"][-1]
            speed, reached = ratios(side, peer, target)
            print(f"| {seed} | {side['side']} | {rate:.3g} | {rate * per_step:.3g} | "
                  f"{'not reached' if reach is None else f'{reach:.1f}'} | {100 * last[2]:.1f}% [{100 * last[3]:.1f}, "
                  f"{100 * last[4]:.1f}] | {side['startup_s']:.1f} | {speed:.2f}x | "
                  f"{'n/a' if reached is None else f'{reached:.2f}x'} |")
    print("\nOver the seeds (each seed's ratio against its own TRL run): min, mean, max")
    names = [s["side"] for s in next(iter(runs.values()))][1:]
    for name in names:
        pairs = [ratios(next(s for s in sides if s["side"] == name), sides[0], target) for sides in runs.values()]
        speed = [p[0] for p in pairs]
        reach = [p[1] for p in pairs if p[1] is not None]
        text = f"- {name}: steps/s {min(speed):.2f} / {statistics.mean(speed):.2f} / {max(speed):.2f}x"
        text += (f"; time to target {min(reach):.2f} / {statistics.mean(reach):.2f} / {max(reach):.2f}x"
                 f" ({len(reach)} of {len(pairs)} seeds reached it on both sides)" if reach else "; time to target n/a")
        print(text)
    for seed, sides in runs.items():
        for side in sides:
            print(f"seed {seed}, {side['side']}: " +
                  ", ".join(f"step {s} {t:.1f}s {100 * a:.1f}%" for s, t, a, *_ in side["curve"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "quickstart.yaml",
                        help="the shape: model, task, eval, SFT and GRPO stages")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.8, help="held-out accuracy to reach")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--staleness", type=int, nargs="+", default=[1])
    parser.add_argument("--trl-generation", nargs="+", default=["transformers"], choices=("transformers", "vllm"))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="TRL's torch threads (default: all cores)")
    parser.add_argument("--root", type=Path, default=Path("runs/vs_trl"))
    parser.add_argument("--sft", type=Path, help="start from this policy directory instead of training SFT")
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    shape = Shape(yaml.safe_load(args.recipe.read_text()))
    policy = shape.sft_policy(root, args.sft)
    runs: dict[int, list[dict]] = {}
    for seed in args.seeds:
        # rlpost first (its own processes), then each TRL run in a spawned process of its own (training,
        # then evaluating its checkpoints), so that nothing of one side is left running beside the other
        ours = [rlpost_side(shape, policy, root, args.steps, args.eval_every, s, seed) for s in args.staleness]
        peers = []
        for generation in args.trl_generation:
            child = multiprocessing.get_context("spawn").Process(
                target=trl_side, args=(shape, policy, root, args.steps, args.eval_every, generation, args.threads, seed))
            child.start()
            child.join()
            if child.exitcode != 0:  # recorded, not fatal: the other sides still compare
                print(f"the TRL run with {generation} generation, seed {seed}, failed (exit code {child.exitcode})")
                continue
            peers.append(json.loads((root / f"trl-{generation}-seed{seed}" / "trl.json").read_text()))
        if not peers:
            raise SystemExit(f"no TRL run of seed {seed} finished: nothing to compare with")
        runs[seed] = peers + ours  # TRL first in the table: the peer
    (root / "vs_trl.json").write_text(json.dumps(runs, indent=1))
    print_tables(shape, policy, runs, args.steps, args.target)


if __name__ == "__main__":
    main()
