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
        from tensorboard.compat.proto.summary_pb2 import Summary

        clean = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
        # One event for the step's scalars, not one per scalar (`add_scalar`): each event costs a
        # handover to the writer thread and a pure-Python CRC, 6 ms a step for 60 scalars here.
        # `_get_file_writer` is the writer's own accessor (private; tests/test_report.py reads the events back).
        summary = Summary(value=[Summary.Value(tag=key, simple_value=value) for key, value in clean.items()])
        self.writer._get_file_writer().add_summary(summary, step)
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


def rl_stage_figures(run_dir: Path, figures: dict) -> dict:
    """An RL stage's record: the loop's figures plus means and extremes from its `metrics.jsonl`."""
    rows = JsonlLog(Path(run_dir) / "metrics.jsonl").rows()
    return {
        "steps": figures["state"]["step"],
        "samples_trained": figures["state"]["samples_trained"],
        "staleness": figures.get("staleness"),
        "rl_loop_s": figures.get("rl_wall_s"),
        "engine_startup_s": figures.get("engine_startup_s"),
        "generation_tokens_per_s": _mean(rows, "rollout/tokens_per_s"),
        "learner_samples_per_s": _mean(rows, "learner/samples_per_s"),
        "weight_sync_reload_s_mean": _mean(rows, "sync/reload_s"),
        "weight_sync_bytes": _mean(rows, "sync/bytes"),
        "weight_sync_reload_s_max": max((r["sync/reload_s_max"] for r in rows if "sync/reload_s_max" in r),
                                        default=None),
        "rollout_workers": rows[-1].get("rollout/workers") if rows else None,
        "worker_restarts": figures.get("worker_restarts"),
        "lora_sync": figures.get("lora_sync"),
        "logprob_mismatch_max": max((r[k] for r in rows for k in ("rollout/logprob_mismatch_max",
                                                                   "sync/logprob_mismatch_max") if k in r),
                                    default=None),
        "masked_samples": sum(r.get("train/masked_samples", 0) for r in rows),
    }
