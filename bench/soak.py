"""Soak: one long GRPO run under random SIGKILLs of rollout workers, reward workers and the learner.

    .venv/bin/python -m bench.soak [--minutes 30] [--steps 1500] [--kill-every 120] [--root runs/soak]

1. SFT once (the quickstart's SFT stage, as bench/algorithms.py trains it) into ROOT/sft, or
   `--sft DIR` to start from an existing policy directory.
2. Two runs of one recipe (that policy -> a grpo stage of `--steps` steps, two rollout workers) start
   side by side: ROOT/baseline is left alone; ROOT/soak is attacked. Every `--kill-every` seconds
   (uniformly 0.5x to 1.5x) one victim, drawn at random among those alive, gets SIGKILL: a rollout
   worker (its pid from workers.jsonl), a reward worker (a child of a rollout worker), or the
   learner itself, once the run has made a step since it last started (its pid only, not its process group). After a learner kill the harness checks
   that no process the learner had started is still running 60 s later, and starts the same command
   again, which resumes from the newest checkpoint. The attack goes on until the run finishes; it
   must have lasted `--minutes` or the harness says so.
3. Printed, and written to ROOT/soak.json: kills by kind, worker restarts, orphans found, resumes;
   whether every step is in the ledger exactly once and the prompts are contiguous; the held-out
   accuracy of both runs with 95% Wilson intervals, and whether the soak run's lies within the
   baseline's interval. Record it in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.algorithms import REPO, from_policy, sft_policy, stage


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def is_reward_worker(pid: int, rollout_worker: int) -> bool:
    """A reward pool process (rewards/pool.py): a forkserver child (the forkserver itself is the rollout
    worker's child), or a spawned child where forkserver is missing; not the resource tracker."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return False
    if b"resource_tracker" in cmdline:
        return False
    if b"forkserver" in cmdline:
        return parent != rollout_worker
    return b"spawn_main" in cmdline


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def victims(run_dir: Path, learner: int) -> dict[str, list[int]]:
    """Live pids by kind: the learner, its rollout workers (newest start of each), their reward workers."""
    newest: dict[int, int] = {}
    for record in jsonl(run_dir / "grpo" / "workers.jsonl"):
        if record["event"] == "ready" and record.get("pid"):
            newest[record["worker"]] = record["pid"]
    ours = set(descendants(learner))
    rollout = [p for p in newest.values() if p in ours and running(p)]
    reward = [c for p in rollout for c in descendants(p) if running(c) and is_reward_worker(c, p)]
    return {"learner": [learner], "rollout_worker": rollout, "reward_worker": reward}


def soak(command: list[str], run_dir: Path, kill_every: float, rng: random.Random, log) -> dict:
    kills: list[dict] = []
    orphans: list[str] = []
    starts = 0
    while True:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log, start_new_session=True)
        starts += 1
        progress_at_start = len(jsonl(run_dir / "grpo" / "ledger.jsonl"))
        learner_killed = False
        while proc.poll() is None:
            deadline = time.monotonic() + kill_every * rng.uniform(0.5, 1.5)
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            if proc.poll() is not None:
                break
            if len(jsonl(run_dir / "grpo" / "ledger.jsonl")) <= progress_at_start:
                continue  # let every (re)start make progress before the next kill
            alive = {k: v for k, v in victims(run_dir, proc.pid).items() if v}
            kind = rng.choice(sorted(alive))
            pid = rng.choice(alive[kind])
            started = descendants(proc.pid) if kind == "learner" else []
            step = len(jsonl(run_dir / "grpo" / "ledger.jsonl"))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            kills.append({"kind": kind, "pid": pid, "at_step": step, "time": time.time()})
            print(f"soak: SIGKILL {kind} {pid} at step {step}", flush=True)
            if kind == "learner":
                proc.wait()
                learner_killed = True
                end = time.monotonic() + 60
                while any(running(p) for p in started) and time.monotonic() < end:
                    time.sleep(0.5)
                orphans += [Path(f"/proc/{p}/cmdline").read_bytes()[:100].decode(errors="replace")
                            for p in started if running(p)]
                break
        if not learner_killed:
            if proc.returncode != 0:
                raise SystemExit(f"the soak run failed (exit {proc.returncode}); see {log.name}")
            return {"kills": kills, "orphans": orphans, "starts": starts}


def ledger_check(run_dir: Path, steps: int, prompts_per_step: int) -> dict:
    rows = jsonl(run_dir / "grpo" / "ledger.jsonl")
    prompts = [i for r in rows for i in r["prompt_indices"]]
    return {"steps_once": [r["step"] for r in rows] == list(range(1, steps + 1)),
            "prompts_contiguous": prompts == list(range(steps * prompts_per_step)),
            "samples_trained": rows[-1]["samples_trained"] if rows else 0}


def held_out(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["evaluations"]["held_out"]["points"]["grpo"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--kill-every", type=float, default=120, help="mean seconds between kills")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=Path("runs/soak"))
    parser.add_argument("--sft", type=Path, help="start from this policy directory instead of training SFT")
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    grpo = stage("grpo", args.steps, staleness=1) | {"save_steps": 25, "eval_steps": args.steps}
    recipe = from_policy(sft_policy(root, args.sft), [grpo], rollout={"workers": args.workers})
    commands = {}
    for name in ("baseline", "soak"):
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe | {"run_dir": str(root / name)}, sort_keys=False))
        commands[name] = [sys.executable, "-m", "rlpost.cli", "run", str(path)]
    start = time.time()
    with open(root / "baseline.log", "w") as baseline_log, open(root / "soak.log", "w") as soak_log:
        baseline = subprocess.Popen(commands["baseline"], cwd=REPO, stdout=baseline_log, stderr=baseline_log)
        attacked = soak(commands["soak"], root / "soak", args.kill_every, random.Random(args.seed), soak_log)
        soak_minutes = (time.time() - start) / 60
        if baseline.wait() != 0:
            raise SystemExit(f"the baseline run failed; see {baseline_log.name}")
    restarts = [r for r in jsonl(root / "soak" / "grpo" / "workers.jsonl") if r["event"] == "died"]
    metrics = jsonl(root / "soak" / "grpo" / "metrics.jsonl")
    crashes = max((m.get("reward/arithmetic_exact/crashes", 0) for m in metrics), default=0)
    ours, theirs = held_out(root / "soak"), held_out(root / "baseline")
    result = {
        "minutes": soak_minutes, "long_enough": soak_minutes >= args.minutes, "steps": args.steps,
        "kills": {k: sum(1 for x in attacked["kills"] if x["kind"] == k)
                  for k in ("learner", "rollout_worker", "reward_worker")},
        "learner_starts": attacked["starts"], "worker_deaths_seen": len(restarts),
        "reward_crashes_counted_last_start": crashes, "orphans": attacked["orphans"],
        **ledger_check(root / "soak", args.steps, grpo["prompts_per_step"]),
        "soak_held_out": ours, "baseline_held_out": theirs,
        "within_baseline_interval": theirs["low"] <= ours["accuracy"] <= theirs["high"],
        "kill_log": attacked["kills"],
    }
    (root / "soak.json").write_text(json.dumps(result, indent=1))
    pct = lambda e: f"{100 * e['accuracy']:.1f}% [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"  # noqa: E731
    print(f"soak: {soak_minutes:.1f} min ({'>=' if result['long_enough'] else 'SHORTER THAN'} {args.minutes}), "
          f"{args.steps} steps, kills {result['kills']}, learner starts {attacked['starts']}, "
          f"worker deaths logged {len(restarts)}, orphans {len(attacked['orphans'])}")
    print(f"ledger: every step once {result['steps_once']}, prompts contiguous {result['prompts_contiguous']}, "
          f"samples trained {result['samples_trained']}")
    print(f"held-out: soak {pct(ours)}, uninterrupted {pct(theirs)}, "
          f"soak within the uninterrupted interval: {result['within_baseline_interval']}")


if __name__ == "__main__":
    main()
