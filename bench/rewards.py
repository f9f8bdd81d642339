"""Reward throughput: samples per second of each verifier, through ``RewardPool`` and in-process.

For every verifier the same batches are scored twice, side by side in one run:

    pool        ``rewards.pool.RewardPool`` with ``--workers`` processes (the production path:
                isolated worker processes, hard per-call timeouts, failure accounting)
    in-process  the reward function called directly in this process (no isolation)

    rate  = samples / (perf_counter seconds spent scoring them)
    ratio = pool rate / in-process rate

A ratio below 1 is the pool's overhead (pickling batches to workers and back, scheduling); above
1, the workers' parallelism outweighs it. Before timing, each pool is started and scores
``WARMUP_SAMPLES`` samples, and the in-process function scores the same ones: start-up
(forkserver, importing the verifier) is printed but is not in the rate. Failures are the pool's
counters (timeouts, exceptions, crashes, wrong_length, nan) over the timed batches only.

Data: arithmetic_exact on addition prompts; math_accuracy on GSM8K test rows (completion = the
row's own gold solution, or another row's, half and half); code_tests on HumanEval (canonical
solution, or another problem's); ifeval_strict / ifeval_loose on IFEval prompts with synthetic
responses; format_tags on tagged / untagged solutions; overlong_penalty on token-id lengths
spread around its 512-token limit.

Run from the repository root:  .venv/bin/python -m bench.rewards [--only NAME] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__":  # run as a script: bench/ must not shadow the `rewards` package
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from rewards.pool import FAILURE_KINDS, RewardPool  # noqa: E402
from rewards.registry import RewardSpec, resolve  # noqa: E402
from rlpost.evaluation.benchmarks import load_humaneval, read_jsonl, vendored_path  # noqa: E402
from rlpost.tasks.arithmetic import AdditionTask, Problem  # noqa: E402

# Samples per verifier when --samples is not given: sized so the whole run (pool + in-process,
# 7 verifiers) stays under about 3 minutes on 2 shared cores.
DEFAULT_SAMPLES = {
    "arithmetic_exact": 20_000,
    "math_accuracy": 2_048,
    "code_tests": 328,  # each HumanEval problem twice: once right, once wrong
    "ifeval_strict": 2_048,
    "ifeval_loose": 2_048,
    "format_tags": 20_000,
    "overlong_penalty": 20_000,
}
TIMEOUT_S = 30.0  # per call (one chunk of a batch); generous, so only real hangs count
WARMUP_SAMPLES = 16  # scored once, untimed, before each timed run


@dataclass
class Workload:
    """One verifier's samples, in TRL's reward-function arguments."""

    prompts: list[Any]
    completions: list[str]
    completion_ids: list[list[int]] | None
    columns: dict[str, list[Any]]

    def batch(self, lo: int, hi: int) -> dict[str, Any]:
        """Keyword arguments for samples lo..hi-1."""
        ids = None if self.completion_ids is None else self.completion_ids[lo:hi]
        return {"prompts": self.prompts[lo:hi], "completions": self.completions[lo:hi],
                "completion_ids": ids, "columns": {k: v[lo:hi] for k, v in self.columns.items()}}


@dataclass
class Row:
    """One line of the result table."""

    verifier: str
    samples: int
    startup_s: float
    pool_per_s: float
    inprocess_per_s: float
    ratio: float
    failures: int
    mean_reward: float | None
    mismatches: int  # samples whose pool value differs from the in-process value


# ---------------------------------------------------------------- workloads


def _strip_calculator(solution: str) -> str:
    """GSM8K solution without its ``<<2*3=6>>`` calculator annotations."""
    return re.sub(r"<<[^>]*>>", "", solution)


def _is_wrong(i: int, n_rows: int) -> bool:
    """Odd samples are wrong, with parity flipped on each pass over the rows, so a row that
    comes back (``i >= n_rows``) is scored right once and wrong once."""
    return (i + i // n_rows) % 2 == 1


def _gsm8k_rows() -> list[dict[str, str]]:
    return read_jsonl(vendored_path("gsm8k/test.jsonl"))


def arithmetic_workload(n: int) -> Workload:
    """Addition prompts; even samples answer correctly, odd ones give the sum of a, b + 1."""
    task = AdditionTask()
    problems = [task.train_problem(seed=0, index=i) for i in range(n)]
    answers = [p.answer for p in problems]
    completions = [p.answer if i % 2 == 0 else Problem(p.a, p.b + 1, p.reverse).answer
                   for i, p in enumerate(problems)]
    return Workload([p.prompt for p in problems], completions, None, {"answer": answers})


def math_workload(n: int) -> Workload:
    """GSM8K test rows; completion = own gold solution or the next row's (see _is_wrong)."""
    rows = _gsm8k_rows()
    picked = [rows[i % len(rows)] for i in range(n)]
    completions = [_strip_calculator(rows[(i + _is_wrong(i, len(rows))) % len(rows)]["answer"])
                   for i in range(n)]
    return Workload([r["question"] for r in picked], completions, None,
                    {"answer": [r["answer"] for r in picked]})


def code_workload(n: int) -> Workload:
    """HumanEval; completion = the canonical solution or the next problem's (see _is_wrong)."""
    rows = load_humaneval().rows
    picked = [rows[i % len(rows)] for i in range(n)]
    completions = [rows[(i + _is_wrong(i, len(rows))) % len(rows)]["reference"] for i in range(n)]
    return Workload([r["prompt"] for r in picked], completions, None,
                    {"test": [r["test"] for r in picked],
                     "entry_point": [r["entry_point"] for r in picked]})


_SENTENCES = (
    "The city grew around a natural harbour that sheltered ships from winter storms",
    "Historians still argue about how much trade passed through it each year",
    "Local records describe markets that sold grain and wool and dyed cloth",
    "A new road connected the port to the inland towns within a single generation",
    "Travellers wrote that the streets were crowded from dawn until late at night",
    "The council spent most of its income on walls and bridges and a public well",
    "Later rulers preferred the river city upstream and the harbour slowly declined",
    "Today the old quarter is a quiet place where visitors come to see the ruins",
)


def _synthetic_response(rng: random.Random, kwargs: list[dict[str, Any]], structured: bool) -> str:
    """An essay-like answer: plain paragraphs, or (structured) with a title, keywords requested by
    the prompt, bullets, a highlight, a P.S. and the requested end phrase."""
    paragraphs = [". ".join(rng.sample(_SENTENCES, rng.randint(3, 6))) + "." for _ in range(3)]
    if not structured:
        return "\n\n".join(paragraphs)
    words = [w for kw in kwargs for w in (kw.get("keywords") or []) + [kw.get("keyword")] if w]
    if words:
        paragraphs[0] += " It is worth mentioning " + " and ".join(words) + "."
    end = next((kw["end_phrase"] for kw in kwargs if kw.get("end_phrase")), "")
    bullets = "\n".join(f"* {s}" for s in rng.sample(_SENTENCES, 3))
    parts = ["<<A Harbour Town>>", *paragraphs, bullets, "*The decline of the harbour*",
             "P.S. Sources disagree on the dates." + (f" {end}" if end else "")]
    return "\n\n".join(parts)


def ifeval_workload(n: int) -> Workload:
    """IFEval prompts with synthetic responses, structured (even) or plain (odd)."""
    rows = read_jsonl(vendored_path("ifeval/input_data.jsonl"))
    rng = random.Random(0)
    picked = [rows[i % len(rows)] for i in range(n)]
    completions = [_synthetic_response(rng, r["kwargs"], i % 2 == 0) for i, r in enumerate(picked)]
    return Workload([r["prompt"] for r in picked], completions, None,
                    {"instruction_id_list": [r["instruction_id_list"] for r in picked],
                     "kwargs": [r["kwargs"] for r in picked]})


def format_workload(n: int) -> Workload:
    """GSM8K solutions wrapped in <think>/<answer> tags (even) or left untagged (odd)."""
    rows = _gsm8k_rows()
    prompts, completions = [], []
    for i in range(n):
        row = rows[i % len(rows)]
        reasoning, _, final = _strip_calculator(row["answer"]).rpartition("####")
        tagged = f"<think>\n{reasoning.strip()}\n</think>\n<answer>{final.strip()}</answer>"
        prompts.append(row["question"])
        completions.append(tagged if i % 2 == 0 else reasoning + "The answer is " + final.strip())
    return Workload(prompts, completions, None, {})


def overlong_workload(n: int) -> Workload:
    """Completions of 0..700 token ids (the penalty starts at 384 and reaches -1 at 512)."""
    rng = random.Random(0)
    lengths = [rng.randint(0, 700) for _ in range(n)]
    ids = [list(range(i, i + length)) for i, length in enumerate(lengths)]
    return Workload([""] * n, ["x" * length for length in lengths], ids, {})


WORKLOADS: dict[str, Callable[[int], Workload]] = {
    "arithmetic_exact": arithmetic_workload,
    "math_accuracy": math_workload,
    "code_tests": code_workload,
    "ifeval_strict": ifeval_workload,
    "ifeval_loose": ifeval_workload,
    "format_tags": format_workload,
    "overlong_penalty": overlong_workload,
}

# ---------------------------------------------------------------- timing


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _call_direct(func: Callable[..., Any], batch: dict[str, Any]) -> list[float | None]:
    columns = batch.pop("columns")
    return list(func(**batch, **columns))


def time_inprocess(name: str, work: Workload, batch_size: int) -> tuple[float, list[float | None]]:
    """Seconds to score every batch by calling the function directly, and the values."""
    func = resolve(name)
    _call_direct(func, work.batch(0, min(WARMUP_SAMPLES, len(work.completions))))
    values: list[float | None] = []
    start = time.perf_counter()
    for lo, hi in _batches(len(work.completions), batch_size):
        values += _call_direct(func, work.batch(lo, hi))
    return time.perf_counter() - start, values


def _failures(pool: RewardPool, name: str) -> int:
    return sum(pool.counts()[name][kind] for kind in FAILURE_KINDS)


def time_pool(name: str, work: Workload, batch_size: int,
              workers: int) -> tuple[float, float, int, list[float | None]]:
    """Start-up seconds, scoring seconds, failures while timed, and the values, via RewardPool."""
    start = time.perf_counter()
    with RewardPool([RewardSpec(name, timeout_s=TIMEOUT_S)], workers=workers) as pool:
        startup_s = time.perf_counter() - start
        pool.score(**work.batch(0, min(WARMUP_SAMPLES, len(work.completions))))
        failures_before = _failures(pool, name)
        values: list[float | None] = []
        start = time.perf_counter()
        for lo, hi in _batches(len(work.completions), batch_size):
            values += pool.score(**work.batch(lo, hi)).per_function[name]
        elapsed = time.perf_counter() - start
        return startup_s, elapsed, _failures(pool, name) - failures_before, values


def bench_one(name: str, samples: int, batch_size: int, workers: int) -> Row:
    """Score one verifier's workload both ways and summarise."""
    work = WORKLOADS[name](samples)
    inproc_s, direct = time_inprocess(name, work, batch_size)
    startup_s, pool_s, failures, pooled = time_pool(name, work, batch_size, workers)
    scored = [v for v in pooled if v is not None]
    pool_rate, inproc_rate = samples / pool_s, samples / inproc_s
    return Row(name, samples, startup_s, pool_rate, inproc_rate, pool_rate / inproc_rate, failures,
               sum(scored) / len(scored) if scored else None,
               sum(a != b for a, b in zip(pooled, direct)))


# ---------------------------------------------------------------- output


def format_table(rows: list[Row]) -> str:
    """A markdown table of the results."""
    lines = ["| verifier | samples | pool start-up s | pool samples/s | in-process samples/s "
             "| ratio | failures | mean reward |", "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        mean = "-" if r.mean_reward is None else f"{r.mean_reward:.3f}"
        lines.append(f"| {r.verifier} | {r.samples} | {r.startup_s:.2f} | {r.pool_per_s:,.0f} "
                     f"| {r.inprocess_per_s:,.0f} | {r.ratio:.3g} | {r.failures} | {mean} |")
    return "\n".join(lines)


def _load(loadavg: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in loadavg)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per verifier (default: per-verifier sizes, ~3 min in all)")
    parser.add_argument("--workers", type=int, default=2, help="RewardPool worker processes")
    parser.add_argument("--batch", type=int, default=64, help="samples per score() call")
    parser.add_argument("--only", choices=sorted(WORKLOADS), help="run one verifier only")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    for key in ("samples", "workers", "batch"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key} must be at least 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = [args.only] if args.only else list(WORKLOADS)
    load_before = os.getloadavg()
    rows = []
    for name in names:
        row = bench_one(name, args.samples or DEFAULT_SAMPLES[name], args.batch, args.workers)
        print(f"{name}: pool start-up {row.startup_s:.2f} s, pool {row.pool_per_s:,.0f}/s, "
              f"in-process {row.inprocess_per_s:,.0f}/s, ratio {row.ratio:.3g}", flush=True)
        if row.mismatches:
            print(f"  warning: {row.mismatches} samples scored differently by the pool", flush=True)
        rows.append(row)
    load_after = os.getloadavg()
    print()
    print(format_table(rows))
    print(f"\nload average (1, 5, 15 min): before {_load(load_before)}, after {_load(load_after)}; "
          f"{os.cpu_count()} CPUs")
    if args.json:
        meta = {"workers": args.workers, "batch": args.batch, "argv": sys.argv[1:],
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count(),
                "loadavg_before": load_before, "loadavg_after": load_after}
        payload = {**meta, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
