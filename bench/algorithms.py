"""Every learner from one SFT checkpoint with one sample budget, on several seeds; and RL under staleness.

    .venv/bin/python -m bench.algorithms [--seeds 0 1 2] [--staleness 0 2 8] [--staleness-seeds 0]
                                         [--steps 100] [--root runs/algorithms]

1. Trains the quickstart's SFT stage once (seed 0) into ROOT/sft: the checkpoint every algorithm starts
   from (`model.path=ROOT/sft/sft/policy`).
2. Runs each algorithm as a one-stage recipe from that checkpoint, for every seed, with the same
   sample budget B = steps x 8 prompts x 16 samples (12,800 at the default 100 steps):
   GRPO and RLOO (`grpo` stage, advantage_estimator grpo / rloo), PPO (`ppo`, value head + GAE),
   online DPO (`online_dpo`, best vs worst of each prompt's 16), PRIME (`prime`, GRPO's loss with
   implicit process rewards), all five on the asynchronous loop at `max_staleness` 2; offline DPO (`dpo`, pairs from B samples of the SFT policy drawn once, 2 epochs);
   rejection sampling (`rejection`, 4 rounds of B/4 samples, SFT on the verified ones).
3. Runs GRPO, RLOO, PPO and online DPO again at each other `--staleness` value on `--staleness-seeds`.

Prints two markdown tables (and writes ROOT/algorithms.json):
- per algorithm: held-out accuracy (1000 prompts, greedy) of each seed with its 95% Wilson interval,
  the mean over seeds with a 95% t-interval across seeds, the smallest gain over the SFT checkpoint,
  whether every seed's interval lies above the SFT checkpoint's, wall time, samples and completion
  tokens drawn;
- per RL algorithm and staleness bound: held-out accuracy, the share of samples that arrived stale
  (and were importance-corrected), and the importance-weight statistics the learner trained on
  (mean, min, max of the per-token truncated weight; online DPO has none: the policy lag of its pairs).

A finished run is reused (its wall time was recorded in ROOT/<run>/bench.json when it ran).
Record the tables in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
PROMPTS, SAMPLES = 8, 16
RL = ("grpo", "rloo", "ppo", "online_dpo", "prime")
SWEPT = ("grpo", "rloo", "ppo", "online_dpo")  # the staleness table's algorithms
ALL = RL + ("offline_dpo", "rejection")
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}  # two-sided 95% t quantiles by sample count


def stage(algorithm: str, steps: int, staleness: int) -> dict:
    """The one stage of `algorithm`'s recipe, spending steps x PROMPTS x SAMPLES samples."""
    budget_prompts = steps * PROMPTS
    rl = {"max_steps": steps, "prompts_per_step": PROMPTS, "num_generations": SAMPLES, "temperature": 1.0,
          "max_completion_length": 6, "max_staleness": staleness, "rewards": ["arithmetic_exact"],
          "save_steps": max(1, steps // 4), "eval_steps": max(1, steps // 2), "learning_rate": 1.0e-4}
    return {
        "grpo": {"type": "grpo", **rl, "beta": 0.0},
        "rloo": {"type": "grpo", **rl, "beta": 0.0, "advantage_estimator": "rloo"},
        "ppo": {"type": "ppo", **rl},
        "online_dpo": {"type": "online_dpo", **rl},
        "prime": {"type": "prime", **rl, "beta": 0.0},
        "offline_dpo": {"type": "dpo", "pairs": "rollouts", "rollout_prompts": budget_prompts,
                        "rollout_samples": SAMPLES, "rollout_max_tokens": 6, "rewards": ["arithmetic_exact"],
                        "held_out_pairs": 100, "loss_type": "sigmoid", "beta": 0.1, "learning_rate": 1.0e-4,
                        "num_train_epochs": 2, "per_device_train_batch_size": 32},
        "rejection": {"type": "rejection", "rounds": 4, "prompts_per_round": budget_prompts // 4,
                      "num_generations": SAMPLES, "max_completion_length": 6, "rewards": ["arithmetic_exact"],
                      "learning_rate": 1.0e-4, "num_train_epochs": 2, "per_device_train_batch_size": 64},
    }[algorithm] | {"name": algorithm}


def base_recipe(full: dict | None = None) -> dict:
    """`full`'s (default: the quickstart's) model, data and eval, with its SFT stages only."""
    full = full or yaml.safe_load(QUICKSTART.read_text())
    return {k: full[k] for k in ("model", "data", "eval")} | {"stages": [s for s in full["stages"] if s["type"] == "sft"]}


def from_policy(policy: Path, stages: list[dict], seed: int = 0, full: dict | None = None, **sections) -> dict:
    """A recipe of `full`'s (default: the quickstart's) data and evaluation with `policy` as the model,
    then `stages`; `sections`: other top-level sections (e.g. rollout={...})."""
    base = base_recipe(full)
    model = {k: v for k, v in base["model"].items() if k != "build"} | {"path": str(policy)}
    return {"seed": seed, "model": model, "data": base["data"], "eval": base["eval"], **sections, "stages": stages}


def sft_policy(root: Path, given: Path | None = None, full: dict | None = None) -> Path:
    """`given`, or the SFT stage of `full` (default: the quickstart's; seed 0) trained once into ROOT/sft
    (reused when finished)."""
    if given is not None:
        return given
    base = base_recipe(full)
    run_recipe(base | {"seed": 0}, root / "sft")
    return root / "sft" / base["stages"][0].get("name", "sft") / "policy"


def run_recipe(recipe: dict, run_dir: Path, learner_ranks: int = 1) -> tuple[dict, float]:
    """`rlpost run` on `recipe` into `run_dir` (reused when finished): its summary and wall seconds.
    `learner_ranks` > 1: under `accelerate launch` (recipes/accelerate/ddp_cpu.yaml), one thread each."""
    marker = run_dir / "bench.json"
    if marker.exists() and (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text()), json.loads(marker.read_text())["wall_s"]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "bench-recipe.yaml"
    path.write_text(yaml.safe_dump(recipe | {"run_dir": str(run_dir)}, sort_keys=False))
    start = time.perf_counter()
    command, env = [sys.executable, "-m", "rlpost.cli", "run", str(path)], None
    if learner_ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                   str(REPO / "recipes" / "accelerate" / "ddp_cpu.yaml"), "--num_processes", str(learner_ranks),
                   "--main_process_port", str(port), "-m", *command[2:]]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(command, cwd=REPO, check=True, env=env)
    wall = time.perf_counter() - start
    marker.write_text(json.dumps({"wall_s": wall}))
    return json.loads((run_dir / "summary.json").read_text()), wall


def drawn(run_dir: Path, algorithm: str, summary: dict) -> tuple[int, int]:
    """(samples, completion tokens) the algorithm drew from vLLM."""
    record = summary["stages"][algorithm]
    if algorithm == "rejection":
        return record["samples"], record["sampled_tokens"]
    if algorithm == "offline_dpo":
        rollouts = json.loads((run_dir / algorithm / "rollouts.json").read_text())
        return rollouts["samples"], rollouts["completion_tokens"]
    rows = [json.loads(line) for line in (run_dir / algorithm / "ledger.jsonl").read_text().splitlines()]
    return sum(r["samples"] for r in rows), sum(r["completion_tokens"] for r in rows)


def staleness_stats(run_dir: Path, algorithm: str, summary: dict) -> dict:
    counts = summary["stages"][algorithm]["staleness"]
    total = counts["fresh"] + counts["corrected"]
    rows = [json.loads(line) for line in (run_dir / algorithm / "metrics.jsonl").read_text().splitlines()]
    out = {"stale_share": counts["corrected"] / total if total else math.nan, "max_seen": counts["max_seen"]}
    pick = lambda key: [r[key] for r in rows if key in r and math.isfinite(r[key])]  # noqa: E731
    if algorithm == "online_dpo":
        lags = pick("train/pair_policy_lag_mean")
        out["pair_lag_mean"] = sum(lags) / len(lags) if lags else math.nan
    else:
        means = pick("rollout/importance_weight_mean")
        out["is_mean"] = sum(means) / len(means) if means else math.nan
        out["is_min"] = min(pick("rollout/importance_weight_min"), default=math.nan)
        out["is_max"] = max(pick("rollout/importance_weight_max"), default=math.nan)
    return out


def pct(e: dict) -> str:
    return f"{100 * e['accuracy']:.1f} [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 2, 8],
                        help="bounds for the staleness table (2 is the main table's)")
    parser.add_argument("--staleness-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALL), choices=ALL)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--root", type=Path, default=Path("runs/algorithms"))
    args = parser.parse_args()
    root = args.root.resolve()

    base = base_recipe()
    sft_summary, sft_wall = run_recipe(base | {"seed": 0}, root / "sft")
    sft_eval = sft_summary["evaluations"]["held_out"]["points"]["sft"]
    checkpoint = root / "sft" / "sft" / "policy"

    results = []
    for algorithm in args.algorithms:
        bounds = [None] if algorithm not in RL else sorted({2} | set(args.staleness)) if algorithm in SWEPT else [2]
        for bound in bounds:
            seeds = args.seeds if bound in (2, None) else args.staleness_seeds
            for seed in seeds:
                name = f"{algorithm}-seed{seed}" + (f"-stale{bound}" if bound is not None else "")
                recipe = from_policy(checkpoint, [stage(algorithm, args.steps, bound or 0)], seed=seed)
                summary, wall = run_recipe(recipe, root / name)
                samples, tokens = drawn(root / name, algorithm, summary)
                result = {"algorithm": algorithm, "seed": seed, "max_staleness": bound, "wall_s": wall,
                          "eval": summary["evaluations"]["held_out"]["points"][algorithm],
                          "samples": samples, "completion_tokens": tokens}
                if bound is not None:
                    result["staleness"] = staleness_stats(root / name, algorithm, summary)
                results.append(result)
                print(f"{name}: {pct(result['eval'])} in {wall:.0f} s", flush=True)
    (root / "algorithms.json").write_text(json.dumps({"sft": sft_eval, "sft_wall_s": sft_wall,
                                                      "steps": args.steps, "results": results}, indent=1))

    print(f"\nSFT checkpoint (seed 0, {sft_wall:.0f} s): held-out {pct(sft_eval)}\n")
    print("| algorithm | held-out per seed, % [95% Wilson] | mean over seeds [95% t] | min gain (points) | "
          "every seed above SFT's interval | wall per run | samples | completion tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for algorithm in args.algorithms:
        rows = [r for r in results if r["algorithm"] == algorithm and r["max_staleness"] in (2, None)]
        accs = [100 * r["eval"]["accuracy"] for r in rows]
        mean = statistics.fmean(accs)
        half = T95[len(accs)] * statistics.stdev(accs) / math.sqrt(len(accs)) if len(accs) > 1 else math.nan
        above = all(r["eval"]["low"] > sft_eval["high"] for r in rows)
        print(f"| {algorithm} | {'; '.join(pct(r['eval']) for r in rows)} | {mean:.1f} [{mean - half:.1f}, "
              f"{mean + half:.1f}] | {min(accs) - 100 * sft_eval['accuracy']:+.1f} | {above} | "
              f"{statistics.fmean(r['wall_s'] for r in rows):.0f} s | {rows[0]['samples']} | "
              f"{statistics.fmean(r['completion_tokens'] for r in rows):.0f} |")

    print("\n| algorithm | max_staleness | seed | held-out, % [95% Wilson] | stale samples | max lag seen | "
          "IS weight mean | IS weight min | IS weight max |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["algorithm"] not in SWEPT or (r["max_staleness"] == 2 and r["seed"] not in args.staleness_seeds):
            continue
        s = r["staleness"]
        weights = (f"{s['is_mean']:.4f} | {s['is_min']:.3f} | {s['is_max']:.3f}" if "is_mean" in s
                   else f"(pairs' mean policy lag {s['pair_lag_mean']:.2f}) | – | –")
        print(f"| {r['algorithm']} | {r['max_staleness']} | {r['seed']} | {pct(r['eval'])} | "
              f"{100 * s['stale_share']:.0f}% | {s['max_seen']} | {weights} |")


if __name__ == "__main__":
    main()
