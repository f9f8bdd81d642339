"""Time per RL step against its bounds, in the quickstart's shape, layouts side by side in one run.

    .venv/bin/python -m bench.async_pipeline [--steps 60] [--warmup 10] [--sft DIR]
                                             [--layouts sync async async-threads2 async-ranks2]

From one SFT policy (bench/algorithms.py's, or `--sft`), the quickstart's grpo stage (8 prompts x 16
samples, at most 6 tokens) runs `--steps` steps once per layout, without evaluations:

    sync            max_staleness 0; learner and rollout worker on 1 thread each. Generation and
                    training alternate, so each part runs alone on the machine.
    async           max_staleness 1; 1 thread each: generation of batch b+1 overlaps training on b.
    async-threads2  max_staleness 1; the learner on 2 threads (`model.learner_threads: 2`).
    async-ranks2    max_staleness 1; 2 learner processes of 1 thread (accelerate launch, DDP).

The work of one step: gen = the worker's seconds per batch (generate + score) plus its weight
reload, train = the learner's seconds per update (TRL loss, backward, AdamW, weight publish);
medians after `--warmup` steps, each the smaller of the sync and async layouts' (one thread, one
process each: in sync each part runs alone but starts cold after idling, in async each has a core
of its own and both are faster). On one thread these are core-seconds, so the bounds for a step are

    one core per part:  max(gen, train)
    the whole machine:  (gen + train) / cores        (no layout can do the same work faster)

Printed per layout: the median step seconds and its ratio to each bound. Record the table in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from bench.algorithms import from_policy, run_recipe, sft_policy, stage

LAYOUTS = {  # name: (max_staleness, learner threads, learner processes)
    "sync": (0, 1, 1),
    "async": (1, 1, 1),
    "async-threads2": (1, 2, 1),
    "async-ranks2": (1, 1, 2),
}


def layout_rows(policy: Path, root: Path, name: str, steps: int) -> list[dict]:
    staleness, threads, ranks = LAYOUTS[name]
    grpo = stage("grpo", steps, staleness) | {"eval_steps": steps, "save_steps": steps}
    recipe = from_policy(policy, [grpo]) | {"eval": []}
    recipe["model"] |= {"threads": 1, "learner_threads": threads}
    run_recipe(recipe, root / name, learner_ranks=ranks)
    return [json.loads(line) for line in (root / name / "grpo" / "metrics.jsonl").read_text().splitlines()]


def median(rows: list[dict], key: str, warmup: int) -> float:
    return statistics.median(r[key] for r in rows if r["step"] > warmup and key in r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--root", type=Path, default=Path("runs/async_pipeline"))
    parser.add_argument("--sft", type=Path, help="start from this policy directory instead of training SFT")
    args = parser.parse_args()
    root = args.root.resolve()
    policy = sft_policy(root, args.sft)
    layouts = ["sync"] + [name for name in args.layouts if name != "sync"]
    rows = {name: layout_rows(policy, root, name, args.steps) for name in layouts}
    plain = [rows[name] for name in ("sync", "async") if name in rows]  # one thread, one process per part
    gen = min(median(r, "rollout/batch_s", args.warmup) + median(r, "sync/reload_s", args.warmup) for r in plain)
    train = min(median(r, "learner/update_s", args.warmup) for r in plain)
    cores = len(os.sched_getaffinity(0))
    one_core, machine = max(gen, train), (gen + train) / cores
    result = {"gen_s": gen, "train_s": train, "cores": cores, "bound_one_core_s": one_core, "bound_machine_s": machine,
              "layouts": {name: median(r, "loop/step_wall_s", args.warmup) for name, r in rows.items()}}
    (root / "async_pipeline.json").write_text(json.dumps(result, indent=1))
    print(f"\n{args.steps} steps per layout, steps {args.warmup + 1}.. counted; medians. Work per step (sync and async layouts): "
          f"gen {gen:.3f} s, train {train:.3f} s; bounds: one core per part {one_core:.3f} s, "
          f"whole machine ({cores} cores) {machine:.3f} s\n")
    print("| layout | step s | step / max(gen, train) | step / ((gen + train) / cores) |")
    print("|---|---|---|---|")
    for name, step in result["layouts"].items():
        print(f"| {name} | {step:.3f} | {step / one_core:.2f} | {step / machine:.2f} |")


if __name__ == "__main__":
    main()
