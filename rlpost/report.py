"""What a user sees of a run: JSONL + TensorBoard scalars, a PNG plot, and `summary.json`."""

from __future__ import annotations

import json
import math
from pathlib import Path


class JsonlLog:
    """Append-only JSON-lines file keyed by `step`; `truncate_after(step)` undoes steps a resume will redo."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        kept = [r for r in self.rows() if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


class MetricsLog:
    """Scalars per step to `metrics.jsonl` and TensorBoard event files under the run directory."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = JsonlLog(Path(run_dir) / "metrics.jsonl")
        self.jsonl.truncate_after(resume_step)
        # purge_step hides events a killed run wrote after its last checkpoint.
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
        for key, value in clean.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.append({"step": step, **clean})

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def plot_training(metrics_path: Path, out_png: Path, title: str) -> Path:
    """Reward (per step, with a moving average) and held-out accuracy with its 95% CI over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = JsonlLog(metrics_path).rows()
    reward = [(r["step"], r["train/reward_mean"]) for r in rows if "train/reward_mean" in r]
    acc = [(r["step"], r["eval/accuracy"], r["eval/accuracy_low"], r["eval/accuracy_high"])
           for r in rows if "eval/accuracy" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if reward:
        steps, values = zip(*reward)
        ax1.plot(steps, values, alpha=0.35, label="mean reward of the batch trained on")
        window = max(1, len(values) // 20)
        smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                  for i in range(len(values))]
        ax1.plot(steps, smooth, label=f"moving average ({window})")
    ax1.set(xlabel="RL step", ylabel="reward", title="training reward")
    ax1.legend()
    if acc:
        steps, mean, low, high = zip(*acc)
        ax2.plot(steps, mean, marker="o")
        ax2.fill_between(steps, low, high, alpha=0.25, label="95% Wilson interval")
        ax2.legend()
    ax2.set(xlabel="RL step", ylabel="accuracy", title="held-out accuracy (greedy)", ylim=(0, 1))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_summary(path: Path, summary: dict) -> None:
    Path(path).write_text(json.dumps(summary, indent=2) + "\n")


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else None


def summarize_rl_run(run_dir: Path, sft: dict, rl: dict, timings: dict) -> dict:
    """The figures a user wants at the end of a run, from `metrics.jsonl` and the stages' records."""
    rows = JsonlLog(Path(run_dir) / "metrics.jsonl").rows()
    start = next((r for r in rows if r["step"] == 0 and "eval/accuracy" in r), None)
    final = rl["final_eval"]
    sft_eval = {"accuracy": start["eval/accuracy"], "low": start["eval/accuracy_low"],
                "high": start["eval/accuracy_high"]} if start else None
    rl_eval = {k: final[k] for k in ("accuracy", "low", "high", "n", "method")}
    return {
        "held_out": {
            "n": final["n"],
            "interval": "95% Wilson",
            "sft": sft_eval,
            "rl": rl_eval,
            "gain_points": None if sft_eval is None else 100 * (rl_eval["accuracy"] - sft_eval["accuracy"]),
            "intervals_overlap": None if sft_eval is None else not (
                rl_eval["low"] > sft_eval["high"] or sft_eval["low"] > rl_eval["high"]),
        },
        "sft": {**{k: sft[k] for k in ("best_val_accuracy", "best_epoch", "epochs_run", "demonstration_accuracy")},
                "stopped_on_plateau": sft.get("stopped_on_plateau")},
        "wall_s": {**timings, "rl_loop_s": rl.get("rl_wall_s")},
        "generation_tokens_per_s": _mean(rows, "rollout/tokens_per_s"),
        "learner_samples_per_s": _mean(rows, "learner/samples_per_s"),
        "weight_sync_reload_s_mean": _mean(rows, "sync/reload_s"),
        "logprob_mismatch_max": max((r[k] for r in rows for k in ("rollout/logprob_mismatch_max",
                                                                   "sync/logprob_mismatch_max") if k in r),
                                    default=None),
        "staleness": rl.get("staleness"),
        "steps": rl["state"]["step"],
        "samples_trained": rl["state"]["samples_trained"],
    }


def format_report(summary: dict) -> str:
    h = summary["held_out"]

    def acc(e):
        return "n/a" if e is None else f"{100 * e['accuracy']:.1f}% [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"

    w = summary["wall_s"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"held-out accuracy (greedy, n={h['n']}, {h['interval']}):",
        f"  SFT checkpoint  {acc(h['sft'])}",
        f"  RL policy       {acc(h['rl'])}",
        f"  gain            {fmt(h['gain_points'], '+.1f')} points; intervals overlap: {h['intervals_overlap']}",
        f"SFT: best validation {100 * summary['sft']['best_val_accuracy']:.1f}% at epoch {summary['sft']['best_epoch']}"
        f" of {summary['sft']['epochs_run']} (stopped on its plateau: {summary['sft']['stopped_on_plateau']}); "
        f"demonstrations correct: {100 * summary['sft']['demonstration_accuracy']:.0f}%",
        "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in w.items() if v is not None),
        f"generation {fmt(summary['generation_tokens_per_s'], '.0f')} tokens/s; "
        f"learner {fmt(summary['learner_samples_per_s'], '.0f')} samples/s; "
        f"weight sync {fmt(summary['weight_sync_reload_s_mean'], '.3f')} s; "
        f"max |logprob vLLM - learner| {fmt(summary['logprob_mismatch_max'], '.1e')}",
        f"steps {summary['steps']}, samples trained {summary['samples_trained']}, staleness {summary['staleness']}",
    ]
    return "\n".join(lines)
