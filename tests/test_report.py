"""Run reporting: the JSONL log, TensorBoard scalars (read back), the PNG plot, an RL stage's record,
and the pipeline's summary (gains and interval overlaps) and its text."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from rlpost.report import JsonlLog, MetricsLog, plot_training, rl_stage_figures


def scalars(tensorboard_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_jsonl_truncate_after_keeps_steps_up_to_and_including(tmp_path):
    log = JsonlLog(tmp_path / "sub" / "log.jsonl")
    assert log.rows() == []
    log.truncate_after(3)  # nothing written yet: no error
    for step in range(5):
        log.append({"step": step, "x": step * 1.5})
    log.truncate_after(2)
    assert log.rows() == [{"step": 0, "x": 0.0}, {"step": 1, "x": 1.5}, {"step": 2, "x": 3.0}]
    log.append({"step": 3, "x": -1.0})
    assert [r["step"] for r in log.rows()] == [0, 1, 2, 3]


def test_metrics_log_writes_finite_scalars_to_tensorboard_and_jsonl(tmp_path):
    metrics = MetricsLog(tmp_path)
    metrics.log(1, {"loss": 0.5, "nan": float("nan"), "inf": float("inf"), "none": None})
    metrics.log(2, {"loss": 0.25, "nan": 3.0})
    metrics.close()
    assert scalars(tmp_path / "tensorboard") == {"loss": [(1, 0.5), (2, 0.25)], "nan": [(2, 3.0)]}
    assert JsonlLog(tmp_path / "metrics.jsonl").rows() == [
        {"step": 1, "loss": 0.5},
        {"step": 2, "loss": 0.25, "nan": 3.0},
    ]


def test_resume_hides_steps_after_the_checkpoint(tmp_path):
    """A run killed at step 5 with its checkpoint at step 2 redoes steps 3.. on resume."""
    first = MetricsLog(tmp_path)
    for step in range(1, 6):
        first.log(step, {"reward": float(step)})
    first.close()
    resumed = MetricsLog(tmp_path, resume_step=2)
    for step in (3, 4):
        resumed.log(step, {"reward": 10.0 * step})
    resumed.close()
    expected = [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert scalars(tmp_path / "tensorboard")["reward"] == expected
    assert [(r["step"], r["reward"]) for r in JsonlLog(tmp_path / "metrics.jsonl").rows()] == expected


def test_plot_training_writes_a_png(tmp_path):
    log = JsonlLog(tmp_path / "metrics.jsonl")
    for step in range(1, 30):
        log.append({"step": step, "train/reward_mean": step / 30})
        if step % 10 == 0:
            log.append({"step": step, "eval/accuracy": 0.5, "eval/accuracy_low": 0.4, "eval/accuracy_high": 0.6})
    out = plot_training(tmp_path / "metrics.jsonl", tmp_path / "training.png", "test run")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def write_metrics(run_dir) -> None:
    log = JsonlLog(run_dir / "metrics.jsonl")
    log.append({"step": 0, "eval/accuracy": 0.5, "eval/accuracy_low": 0.4, "eval/accuracy_high": 0.6})
    log.append({"step": 1, "rollout/tokens_per_s": 100.0, "learner/samples_per_s": 10.0, "sync/reload_s": 0.1,
                "rollout/logprob_mismatch_max": 1e-6, "train/masked_samples": 3.0})
    log.append({"step": 2, "rollout/tokens_per_s": 300.0, "learner/samples_per_s": 30.0, "sync/reload_s": 0.3,
                "rollout/logprob_mismatch_max": 3e-6, "sync/logprob_mismatch_max": 5e-6,
                "train/masked_samples": 4.0})
    log.append({"step": 2, "eval/accuracy": 0.62, "eval/accuracy_low": 0.5, "eval/accuracy_high": 0.7})


LOOP_FIGURES = {"start_step": 0, "engine_startup_s": 7.0, "rl_wall_s": 50.0,
                "staleness": {"fresh": 200, "corrected": 56, "dropped": 1, "max_seen": 1},
                "state": {"step": 2, "samples_trained": 256, "next_prompt_index": 16, "staleness": {}}}


def test_rl_stage_record_from_a_synthetic_run(tmp_path):
    write_metrics(tmp_path)
    record = rl_stage_figures(tmp_path, LOOP_FIGURES)
    assert (record["steps"], record["samples_trained"]) == (2, 256)
    assert record["staleness"] == {"fresh": 200, "corrected": 56, "dropped": 1, "max_seen": 1}
    assert record["rl_loop_s"] == 50.0 and record["engine_startup_s"] == 7.0
    assert record["generation_tokens_per_s"] == pytest.approx(200.0)  # mean of 100 and 300
    assert record["learner_samples_per_s"] == pytest.approx(20.0)
    assert record["weight_sync_reload_s_mean"] == pytest.approx(0.2)
    assert record["logprob_mismatch_max"] == 5e-6  # the largest of the learner's and the probe's
    assert record["masked_samples"] == 7  # 3 + 4
    json.dumps(record)  # it goes into stage.json and summary.json


def test_rl_stage_record_without_metrics(tmp_path):
    record = rl_stage_figures(tmp_path, {"state": {"step": 0, "samples_trained": 0}})
    assert (record["steps"], record["samples_trained"], record["masked_samples"]) == (0, 0, 0)
    for key in ("generation_tokens_per_s", "learner_samples_per_s", "weight_sync_reload_s_mean",
                "logprob_mismatch_max", "staleness", "rl_loop_s"):
        assert record[key] is None, key


def _point(accuracy: float, low: float, high: float, n: int = 1000) -> dict:
    return {"accuracy": accuracy, "low": low, "high": high, "n": n, "method": "wilson", "figures": {}}


def _recipe():
    from rlpost.recipe import EvalSpec

    return SimpleNamespace(source="recipes/mine.yaml", seed=3,
                           eval=[EvalSpec(benchmark="held_out"), EvalSpec(benchmark="gsm8k", name="math")])


EVALUATIONS = {
    "initial": {"held_out": _point(0.10, 0.05, 0.15), "math": _point(0.30, 0.20, 0.40, n=200)},
    "sft": {"held_out": _point(0.50, 0.40, 0.60), "math": _point(0.35, 0.25, 0.45, n=200)},
    "grpo": {"held_out": _point(0.70, 0.65, 0.75), "math": _point(0.475, 0.45, 0.50, n=200)},
}
RECORDS = {"sft": {"type": "sft", "best_val_accuracy": 0.55, "epochs_run": 6, "history": [[1, 0.5]]},
           "grpo": {"type": "grpo", "steps": 2, "samples_trained": 256, "staleness": {"dropped": 1},
                    "logprob_mismatch_max": 3e-6}}


def test_summary_gains_and_interval_overlap_by_hand(tmp_path):
    from rlpost.pipeline import summarize

    summary = summarize(_recipe(), tmp_path, RECORDS, EVALUATIONS, ["initial", "sft", "grpo"])
    json.dumps(summary)  # summary.json must be serialisable
    assert (summary["recipe"], summary["seed"], summary["run_dir"]) == ("recipes/mine.yaml", 3, str(tmp_path))
    assert summary["points"] == ["initial", "sft", "grpo"]
    held = summary["evaluations"]["held_out"]
    assert held["points"]["sft"] == {"accuracy": 0.50, "low": 0.40, "high": 0.60, "n": 1000}
    assert held["interval"] == "95%" and list(held["gains"]) == ["sft", "grpo"]  # no gain for the start
    assert held["gains"]["sft"]["gain_points"] == pytest.approx(40.0)  # 100 * (0.5 - 0.1)
    assert held["gains"]["sft"]["intervals_overlap"] is False  # sft low 0.40 > initial high 0.15
    assert held["gains"]["grpo"]["gain_points"] == pytest.approx(20.0)  # 100 * (0.7 - 0.5)
    assert held["gains"]["grpo"]["intervals_overlap"] is False  # grpo low 0.65 > sft high 0.60
    math = summary["evaluations"]["math"]
    assert math["gains"]["sft"]["gain_points"] == pytest.approx(5.0)
    assert math["gains"]["sft"]["intervals_overlap"] is True  # [0.25, 0.45] and [0.20, 0.40]
    assert math["gains"]["grpo"]["gain_points"] == pytest.approx(12.5)  # 100 * (0.475 - 0.35)
    assert math["gains"]["grpo"]["intervals_overlap"] is True  # [0.45, 0.50] touches [0.25, 0.45]
    assert "history" not in summary["stages"]["sft"] and summary["stages"]["sft"]["epochs_run"] == 6
    assert summary["stages"]["grpo"] == RECORDS["grpo"]


def test_summary_intervals_that_do_not_touch(tmp_path):
    from rlpost.pipeline import summarize

    evaluations = {"initial": {"held_out": _point(0.50, 0.40, 0.60), "math": _point(0.3, 0.2, 0.4)},
                   "sft": {"held_out": _point(0.20, 0.10, 0.3999), "math": _point(0.3, 0.2, 0.4)}}
    summary = summarize(_recipe(), tmp_path, {"sft": RECORDS["sft"]}, evaluations, ["initial", "sft"])
    gain = summary["evaluations"]["held_out"]["gains"]["sft"]
    assert gain["gain_points"] == pytest.approx(-30.0)
    assert gain["intervals_overlap"] is False  # initial low 0.40 > sft high 0.3999: a drop, no overlap


def test_format_report_shows_every_point_gain_and_stage(tmp_path):
    from rlpost.pipeline import format_report, summarize

    text = format_report(summarize(_recipe(), tmp_path, RECORDS, EVALUATIONS, ["initial", "sft", "grpo"]))
    lines = text.splitlines()
    assert "held_out (95% intervals):" in lines and "math (95% intervals):" in lines
    initial = next(line for line in lines if "initial" in line and "10.0%" in line)
    assert "[5.0, 15.0]" in initial and "n=1000" in initial and "points" not in initial
    for piece in ("50.0% [40.0, 60.0]  n=1000  +40.0 points, intervals overlap: False",
                  "70.0% [65.0, 75.0]  n=1000  +20.0 points, intervals overlap: False",
                  "35.0% [25.0, 45.0]  n=200  +5.0 points, intervals overlap: True",
                  "47.5% [45.0, 50.0]  n=200  +12.5 points, intervals overlap: True"):
        assert piece in text, piece
    sft = next(line for line in lines if line.startswith("stage sft (sft):"))
    assert "best_val_accuracy 0.55" in sft and "epochs_run 6" in sft and "history" not in sft
    grpo = next(line for line in lines if line.startswith("stage grpo (grpo):"))
    assert "steps 2" in grpo and "samples_trained 256" in grpo and "3e-06" in grpo


def test_plot_draws_every_kind_of_stage(tmp_path):
    """summary stages of every kind (an SFT validation curve, DPO's logged windows, RL metrics) plot without error."""
    import json as _json

    from rlpost.pipeline import plot

    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "stage.json").write_text(_json.dumps({"type": "sft", "history": [[1, 0.1], [2, 0.3]]}))
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "stage.json").write_text(_json.dumps(
        {"type": "dpo", "history": [{"step": 10, "loss": 0.69, "rewards/accuracies": 0.5},
                                    {"step": 20, "loss": 0.6, "rewards/accuracies": 0.8}]}))
    # an RL stage run without evaluations: its first metrics row is step 1, with a train/loss like DPO's
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "metrics.jsonl").write_text("".join(
        _json.dumps({"step": k, "train/loss": 0.1, "train/reward_mean": 0.5}) + "\n" for k in (1, 2)))
    point = {"accuracy": 0.3, "low": 0.2, "high": 0.4, "n": 10}
    summary = {"stages": {"sft": {"type": "sft"}, "dpo": {"type": "dpo"}, "grpo": {"type": "grpo"}},
               "evaluations": {"held_out": {"points": {"initial": point, "sft": point, "dpo": point, "grpo": point}}}}
    assert plot(tmp_path, summary).stat().st_size > 0
