"""The quickstart on several seeds, each a fresh run: does the RL gain over SFT hold on every one?

    .venv/bin/python -m bench.quickstart_seeds [--seeds 0 1 2] [--root runs]

Runs `rlpost run seed=S run_dir=ROOT/seedS` for each seed (an existing finished run is reused) and
prints one row per seed: how SFT ended (best epoch, epochs run, plateau or cap), held-out accuracy
of the SFT policy and of the RL policy with 95% Wilson intervals, the gain and whether the
intervals overlap, and wall time. Record the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run_seed(seed: int, root: Path) -> tuple[dict, float]:
    run_dir = root / f"seed{seed}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rlpost.cli", "run", f"seed={seed}", f"run_dir={run_dir}"], check=True)
    return json.loads((run_dir / "summary.json").read_text()), time.perf_counter() - start


def row(seed: int, summary: dict, wall_s: float) -> str:
    sft = summary["stages"]["sft"]
    table = summary["evaluations"]["held_out"]
    points, gain = table["points"], table["gains"]["grpo"]
    fmt = lambda e: f"{100 * e['accuracy']:.1f}% [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"  # noqa: E731
    ended = "plateau" if sft["stopped_on_plateau"] else "cap"
    return (f"| {seed} | {sft['best_epoch']} / {sft['epochs_run']} ({ended}) | {fmt(points['sft'])} | "
            f"{fmt(points['grpo'])} | {gain['gain_points']:+.1f} | {gain['intervals_overlap']} | {wall_s:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path("runs"))
    args = parser.parse_args()
    rows = [row(seed, *run_seed(seed, args.root)) for seed in args.seeds]
    print("| seed | SFT best / run epochs (ended on) | SFT held-out | RL held-out | gain (points) | "
          "intervals overlap | wall |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
