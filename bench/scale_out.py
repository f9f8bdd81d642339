"""Scale-out: the same GRPO stage with 1 and with 2 rollout workers (or learner ranks), side by side in one run.

    .venv/bin/python -m bench.scale_out [--steps 100] [--layouts ray:1 ray:2 process:1 process:2] [--sft DIR]
    .venv/bin/python -m bench.scale_out --staleness 0 --layouts process:1 process:1:2    # learner ranks

Each layout (backend:workers[:learner ranks], ranks under `accelerate launch` with
recipes/accelerate/ddp_cpu.yaml) runs one recipe (the quickstart's SFT policy, trained once as
bench/algorithms.py does or given by `--sft`, then a grpo stage of `--steps` steps at max_staleness 0
and at 1) one after the other on this machine. Printed per layout: held-out accuracy after RL with
its 95% Wilson interval, wall seconds of the RL loop, steps/s, rollout tokens/s (every engine's
tokens over the slowest chunk's generation time, per batch), mean and max weight-load seconds per
engine, engine start-up; then each figure as a ratio to the first layout. Record the table in
docs/benchmarks.md.

On a 2-core machine the learner and two engines share two cores, so a second engine can help only
where generation waits on itself, not on the learner; docs/scaling.md says where the bound moves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.algorithms import from_policy, run_recipe, sft_policy, stage


def layout_recipe(policy: Path, steps: int, staleness: int, backend: str, workers: int) -> dict:
    grpo = stage("grpo", steps, staleness) | {"eval_steps": steps, "save_steps": steps}
    return from_policy(policy, [grpo], rollout={"backend": backend, "workers": workers})


def figures(summary: dict, wall_s: float) -> dict:
    record = summary["stages"]["grpo"]
    point = summary["evaluations"]["held_out"]["points"]["grpo"]
    return {"accuracy": point["accuracy"], "low": point["low"], "high": point["high"], "wall_s": wall_s,
            "rl_loop_s": record["rl_loop_s"], "steps_per_s": record["steps"] / record["rl_loop_s"],
            "tokens_per_s": record["generation_tokens_per_s"], "reload_s": record["weight_sync_reload_s_mean"],
            "reload_s_max": record.get("weight_sync_reload_s_max"), "startup_s": record["engine_startup_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--layouts", nargs="+", default=["ray:1", "ray:2", "process:1", "process:2"])
    parser.add_argument("--root", type=Path, default=Path("runs/scale_out"))
    parser.add_argument("--sft", type=Path, help="start from this policy directory instead of training SFT")
    args = parser.parse_args()
    root = args.root.resolve()
    policy = sft_policy(root, args.sft)
    rows = []
    for staleness in args.staleness:
        for layout in args.layouts:
            backend, workers, ranks = (layout.split(":") + ["1"])[:3]
            recipe = layout_recipe(policy, args.steps, staleness, backend, int(workers))
            name = f"{backend}{workers}" + (f"-ranks{ranks}" if ranks != "1" else "")
            summary, wall = run_recipe(recipe, root / f"{name}-stale{staleness}", learner_ranks=int(ranks))
            rows.append({"layout": layout, "staleness": staleness, **figures(summary, wall)})
    (root / "scale_out.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{args.steps} GRPO steps x 8 prompts x 16 samples from one SFT policy; ratios to the first "
          f"layout at the same staleness\n")
    print("| layout | max_staleness | held-out after RL | RL loop s | steps/s (ratio) | rollout tokens/s (ratio) | "
          "weight load s mean / max | engine start s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        first = next(r for r in rows if r["staleness"] == row["staleness"])
        print(f"| {row['layout']} | {row['staleness']} | {100 * row['accuracy']:.1f}% [{100 * row['low']:.1f}, "
              f"{100 * row['high']:.1f}] | {row['rl_loop_s']:.0f} | {row['steps_per_s']:.2f} "
              f"({row['steps_per_s'] / first['steps_per_s']:.2f}x) | {row['tokens_per_s']:.0f} "
              f"({row['tokens_per_s'] / first['tokens_per_s']:.2f}x) | {row['reload_s']:.3f} / "
              f"{row['reload_s_max'] or float('nan'):.3f} | {row['startup_s']:.1f} |")


if __name__ == "__main__":
    main()
