"""Run reporting: the JSONL log, TensorBoard scalars (read back), the PNG plot, the summary and its text."""

from __future__ import annotations

import json

import pytest

from rlpost.report import JsonlLog, MetricsLog, format_report, plot_training, summarize_rl_run


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


SFT = {"best_val_accuracy": 0.55, "best_epoch": 3, "epochs_run": 6, "demonstration_accuracy": 0.4, "history": []}


def write_metrics(run_dir, with_start_eval: bool) -> None:
    log = JsonlLog(run_dir / "metrics.jsonl")
    if with_start_eval:
        log.append({"step": 0, "eval/accuracy": 0.5, "eval/accuracy_low": 0.4, "eval/accuracy_high": 0.6})
    log.append({"step": 1, "rollout/tokens_per_s": 100.0, "learner/samples_per_s": 10.0, "sync/reload_s": 0.1,
                "rollout/logprob_mismatch_max": 1e-6})
    log.append({"step": 2, "rollout/tokens_per_s": 300.0, "learner/samples_per_s": 30.0, "sync/reload_s": 0.3,
                "rollout/logprob_mismatch_max": 3e-6})
    log.append({"step": 2, "eval/accuracy": 0.62, "eval/accuracy_low": 0.5, "eval/accuracy_high": 0.7})


def rl_record(low: float) -> dict:
    return {"final_eval": {"accuracy": 0.7, "low": low, "high": 0.75, "n": 1000, "method": "greedy"},
            "rl_wall_s": 50.0, "staleness": {"dropped": 1}, "state": {"step": 2, "samples_trained": 256}}


def test_summary_and_report_from_a_synthetic_run(tmp_path):
    write_metrics(tmp_path, with_start_eval=True)
    summary = summarize_rl_run(tmp_path, SFT, rl_record(low=0.65), {"sft_s": 12.0, "rl_s": 60.0})
    held = summary["held_out"]
    assert held["sft"] == {"accuracy": 0.5, "low": 0.4, "high": 0.6}
    assert held["gain_points"] == pytest.approx(20.0)  # 100 * (0.7 - 0.5)
    assert held["intervals_overlap"] is False  # RL low 0.65 > SFT high 0.6
    assert summary["generation_tokens_per_s"] == pytest.approx(200.0)  # mean of 100 and 300
    assert summary["learner_samples_per_s"] == pytest.approx(20.0)
    assert summary["weight_sync_reload_s_mean"] == pytest.approx(0.2)
    assert summary["logprob_mismatch_max"] == 3e-6
    assert summary["wall_s"] == {"sft_s": 12.0, "rl_s": 60.0, "rl_loop_s": 50.0}
    assert (summary["steps"], summary["samples_trained"]) == (2, 256)
    json.dumps(summary)  # summary.json must be serialisable

    text = format_report(summary)
    for piece in ("n=1000", "SFT checkpoint  50.0% [40.0, 60.0]", "RL policy       70.0% [65.0, 75.0]",
                  "+20.0 points", "intervals overlap: False", "generation 200 tokens/s", "learner 20 samples/s",
                  "weight sync 0.200 s", "3.0e-06", "steps 2, samples trained 256"):
        assert piece in text, piece

    overlapping = summarize_rl_run(tmp_path, SFT, rl_record(low=0.58), {})
    assert overlapping["held_out"]["intervals_overlap"] is True


def test_summary_without_a_starting_evaluation(tmp_path):
    write_metrics(tmp_path, with_start_eval=False)
    summary = summarize_rl_run(tmp_path, SFT, rl_record(low=0.65), {})
    assert summary["held_out"]["sft"] is None and summary["held_out"]["gain_points"] is None
    assert "SFT checkpoint  n/a" in format_report(summary)
