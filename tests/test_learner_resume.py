"""Every learner resumes after SIGKILL with no lost or repeated step, prompt or sample.

Each test runs the real CLI (`python -m rlpost.cli run RECIPE.yaml run_dir=...`) on the tiny model, the
SFT stage (and its evaluations) reused from one tiny SFT-only run, then one stage of each learner:
ppo, online_dpo, rejection (rounds) and dpo with pairs from rollouts (grpo, and so RLOO, which only
changes its advantages: tests/test_rl_loop.py; prime: tests/test_prime.py). The run is SIGKILLed as a whole process group mid-stage,
after a checkpoint exists; the same command is run again and the stage's own records are checked:
RUN/<stage>/ledger.jsonl, metrics.jsonl and checkpoints for the rollout-stream learners,
RUN/rejection/round-n/* for rejection, RUN/dpo/pairs.jsonl and TRL's trainer state for dpo, and the
stage's record in RUN/<stage>/stage.json and RUN/summary.json.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.spine_helpers import NO_EVAL, REPO, copy_sft, quickstart_cmd, run, sft_only_recipe

pytestmark = pytest.mark.slow

GROUPS, GROUP_SIZE = 4, 4  # prompts_per_step, num_generations
# killed once step 4 is in the ledger (past the step-3 checkpoint), resumed from 3: step 4 is redone, not repeated,
# and the stage ends at 7, no multiple of save_steps, checkpointed as the last step
STEPS = 7
# the 1-epoch SFT policy gets no sum right: a small length term makes the rewards of a group differ
RANKING_REWARDS = ["arithmetic_exact", {"name": "tests.reward_fixtures:length_reward", "weight": 0.1}]
ROLLOUT_KEYS = {"max_steps": STEPS, "prompts_per_step": GROUPS, "num_generations": GROUP_SIZE, "save_steps": 3,
                "eval_steps": STEPS, "reward_workers": 1, "max_staleness": 1, "max_completion_length": 6}


# ----------------------------------------------------------------------------- helpers


def reuse_sft(sft_run: Path, run_dir: Path, evals: bool = True) -> None:
    """The SFT stage, the built model and (with `evals`) their evaluations (same eval settings: the TINY
    overrides), so a test pays only for its own stage. The rejection and DPO tests read no evaluation
    and run with NO_EVAL; the rollout-stream ones keep theirs (their metrics start with step 0's)."""
    copy_sft(sft_run, run_dir, evals=evals)


def stage_recipe(directory: Path, stage: dict) -> Path:
    """The quickstart's model, data and eval, its sft stage, then `stage`."""
    directory.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load(sft_only_recipe(directory).read_text())
    recipe["stages"].append(stage)
    path = directory / f"{stage['type']}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def run_until_killed(cmd: list[str], log: Path, ready, timeout_s: float = 400) -> None:
    """Start `cmd` in its own session; once `ready()` holds, SIGKILL its whole process group."""
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the kill point:\n{tail(log)}"
            assert time.monotonic() < deadline, f"kill point not reached in {timeout_s} s:\n{tail(log)}"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def resume(cmd: list[str]) -> subprocess.CompletedProcess:
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def stage_record(run_dir: Path, name: str, kind: str) -> dict:
    """The stage's record (stage.json) after checking that the summary has it and reused the sft stage."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == ["sft", name], summary["stages"].keys()
    assert summary["points"] == ["initial", "sft", name]
    record = json.loads((run_dir / name / "stage.json").read_text())
    assert record["type"] == kind
    return record


def checkpoint_steps(stage_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (stage_dir / "checkpoints").glob("step-*")
                  if (p / "state.json").exists())


def check_contiguous(rows: list[dict], steps: int, groups: int, group_size: int) -> None:
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "steps have a gap or a repeat"
    prompts = [i for r in rows for i in r["prompt_indices"]]
    assert prompts == list(range(steps * groups)), "prompts were skipped or trained on twice"
    assert [r["samples"] for r in rows] == [groups * group_size] * steps
    assert [r["samples_trained"] for r in rows] == [k * groups * group_size for k in range(1, steps + 1)]


def kill_and_resume_rl(run_dir: Path, name: str, cmd: list[str]) -> tuple[dict, subprocess.CompletedProcess]:
    """Kill a rollout-stream stage (`name`) once a step past its step-3 checkpoint is in the ledger, resume it,
    and check what every such stage must satisfy; returns (the stage's record, the resumed run's result)."""
    stage_dir = run_dir / name
    ledger_path = stage_dir / "ledger.jsonl"
    run_until_killed(cmd, run_dir / "killed.log", lambda: line_count(ledger_path) >= 4)
    before = jsonl(ledger_path)
    killed_at = len(before)
    assert 4 <= killed_at < STEPS, f"kill landed at step {killed_at}; the test needs it mid-run"
    assert not (stage_dir / "stage.json").exists() and not (run_dir / "summary.json").exists()
    saved = checkpoint_steps(stage_dir)
    assert saved and 3 <= saved[-1] <= killed_at, saved
    resumed_from = saved[-1]

    result = resume(cmd)
    assert f"(step {resumed_from})" in result.stderr and "resuming from" in result.stderr, result.stderr[-3000:]
    rows = jsonl(ledger_path)
    check_contiguous(rows, STEPS, GROUPS, GROUP_SIZE)
    assert rows[:resumed_from] == before[:resumed_from], "the steps up to the checkpoint were rewritten"
    for row in rows:  # the staleness bound holds across the resume too
        assert all(0 <= row["step"] - 1 - v <= 1 for v in row["policy_versions"]), row
    steps_logged = [m["step"] for m in jsonl(stage_dir / "metrics.jsonl")]
    assert steps_logged == list(range(STEPS + 1)), "metrics lose or repeat a step after resume"
    record = stage_record(run_dir, name, name)
    assert record["steps"] == STEPS and record["samples_trained"] == STEPS * GROUPS * GROUP_SIZE
    counted = record["staleness"]  # the gate's counts continue across the resume
    assert counted["fresh"] + counted["corrected"] == STEPS * GROUPS * GROUP_SIZE and counted["dropped"] == 0
    assert checkpoint_steps(stage_dir)[-1] == STEPS
    assert (stage_dir / "policy" / "model.safetensors").exists()
    return record, result


# ----------------------------------------------------------------------------- rollout-stream learners


def test_ppo_resumes_after_sigkill_with_its_value_head(sft_run, tmp_path):
    """PPO killed mid-run: the ledger stays contiguous (steps 1..N once, prompts 0..N*groups-1,
    samples_trained cumulative), and the value head and batch counter come back from the checkpoint's
    learner_extra.safetensors (the counter that seeds the mini-batch shuffle ends at N, not N - k)."""
    from safetensors.torch import load_file

    from rlpost.learners.ppo import BATCHES_KEY
    from rlpost.loop import EXTRA_STATE

    run_dir = tmp_path / "run"
    reuse_sft(sft_run, run_dir)
    stage = {"type": "ppo", **ROLLOUT_KEYS, "num_ppo_epochs": 2, "num_mini_batches": 2, "rewards": RANKING_REWARDS}
    cmd = quickstart_cmd(run_dir, recipe=stage_recipe(tmp_path / "recipe", stage))
    record, _ = kill_and_resume_rl(run_dir, "ppo", cmd)
    for step in checkpoint_steps(run_dir / "ppo"):
        extra = load_file(str(run_dir / "ppo" / "checkpoints" / f"step-{step:06d}" / EXTRA_STATE))
        assert int(extra[BATCHES_KEY]) == step, "the PPO batch counter was not restored on resume"
        assert float(extra["value_head.weight"].abs().sum()) > 0
    trained = [m for m in jsonl(run_dir / "ppo" / "metrics.jsonl") if "train/value_loss" in m]
    assert [m["step"] for m in trained] == list(range(1, STEPS + 1))
    assert all(m["train/optimizer_steps"] == 4 and math.isfinite(m["train/value_loss"]) for m in trained)
    assert record["masked_samples"] == 0


def test_online_dpo_resumes_after_sigkill(sft_run, tmp_path):
    """Online DPO killed mid-run: contiguous ledger and metrics, one optimiser step per step with a pair."""
    run_dir = tmp_path / "run"
    reuse_sft(sft_run, run_dir)
    stage = {"type": "online_dpo", **ROLLOUT_KEYS, "rewards": RANKING_REWARDS}
    cmd = quickstart_cmd(run_dir, recipe=stage_recipe(tmp_path / "recipe", stage))
    kill_and_resume_rl(run_dir, "online_dpo", cmd)
    trained = [m for m in jsonl(run_dir / "online_dpo" / "metrics.jsonl") if "train/pairs" in m]
    assert [m["step"] for m in trained] == list(range(1, STEPS + 1))
    assert all(m["train/optimizer_steps"] == float(m["train/pairs"] > 0) for m in trained)
    assert sum(m["train/pairs"] for m in trained) > 0, "no step trained on a pair"


# ----------------------------------------------------------------------------- rejection sampling


ROUNDS, PROMPTS, GENERATIONS = 3, 16, 4


def test_rejection_killed_in_a_later_rounds_training_resumes_without_redoing_a_round(sft_run, tmp_path):
    """Rejection sampling killed while round 2 trains (round 1 done, round 2 sampled, a trainer epoch
    checkpoint written): the resume skips round 1 (its files untouched), trains round 2 on its saved
    samples (no new sampling) from the trainer's checkpoint, then runs round 3. Every round's
    samples.jsonl covers exactly its prompt indices, each num_generations times, and the stage's
    record counts match the files."""
    run_dir = tmp_path / "run"
    reuse_sft(sft_run, run_dir, evals=False)
    # length >= 1: every non-empty completion passes, so every round has samples to train on; 4 epochs: the kill
    # after round 2's first epoch checkpoint leaves 3 of them to resume
    stage = {"type": "rejection", "rounds": ROUNDS, "prompts_per_round": PROMPTS, "num_generations": GENERATIONS,
             "keep_per_prompt": GENERATIONS, "threshold": 1.0, "rewards": ["tests.reward_fixtures:length_reward"],
             "reward_workers": 1, "learning_rate": 1e-4, "per_device_train_batch_size": 4, "num_train_epochs": 4}
    cmd = quickstart_cmd(run_dir, NO_EVAL, recipe=stage_recipe(tmp_path / "recipe", stage))
    stage_dir = run_dir / "rejection"
    round_dir = lambda n: stage_dir / f"round-{n}"  # noqa: E731

    def round_2_trainer_checkpoint() -> bool:
        return any((c / "trainer_state.json").exists() for c in (round_dir(2) / "trainer").glob("checkpoint-*"))

    run_until_killed(cmd, run_dir / "killed.log", round_2_trainer_checkpoint)
    assert (round_dir(1) / "round.json").exists() and (round_dir(2) / "sampling.json").exists()
    assert not (round_dir(2) / "round.json").exists(), "round 2 finished before the kill"
    assert not round_dir(3).exists() and not (stage_dir / "stage.json").exists()
    kept_files = {p: snapshot(p) for p in (round_dir(1) / "samples.jsonl", round_dir(1) / "round.json",
                                          round_dir(1) / "sampling.json", round_dir(2) / "samples.jsonl",
                                          round_dir(2) / "sampling.json")}

    result = resume(cmd)
    for path, before in kept_files.items():
        assert snapshot(path) == before, f"{path.relative_to(run_dir)} was rewritten: a finished step was redone"
    assert "round 1 is done" in result.stderr and "round 2: reusing its" in result.stderr, result.stderr[-3000:]
    assert "resuming SFT from" in result.stderr, "round 2's training restarted instead of resuming"
    assert "round 2 is done" not in result.stderr

    record = stage_record(run_dir, "rejection", "rejection")
    rounds = record["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    kept_total = 0
    for n, r in enumerate(rounds, start=1):
        start, stop = (n - 1) * PROMPTS, n * PROMPTS
        assert r["prompt_indices"] == [start, stop]
        samples = jsonl(round_dir(n) / "samples.jsonl")
        indices = [s["prompt_index"] for s in samples]
        assert indices == [i for i in range(start, stop) for _ in range(GENERATIONS)], f"round {n}'s prompts"
        kept = sum(s["kept"] for s in samples)
        assert r["samples"] == len(samples) == PROMPTS * GENERATIONS and r["kept"] == kept > 0 and r["trained"]
        assert json.loads((round_dir(n) / "round.json").read_text()) == r
        assert not (round_dir(n) / "trainer").exists()
        kept_total += kept
    assert record["samples"] == ROUNDS * PROMPTS * GENERATIONS and record["kept"] == kept_total
    assert (stage_dir / "policy" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- offline DPO on rollout pairs


def test_dpo_on_rollout_pairs_resumes_from_its_trainer_checkpoint(sft_run, tmp_path):
    """DPO (pairs: rollouts) killed during training after an epoch checkpoint: the resume reads the cached
    pairs (pairs.jsonl untouched, no new rollouts), continues from TRL's checkpoint and ends at exactly
    epochs x ceil(pairs trained / batch) optimiser steps, its logged steps never repeated."""
    run_dir = tmp_path / "run"
    reuse_sft(sft_run, run_dir, evals=False)
    # ~56 trained pairs: 14 steps an epoch, so the kill after epoch 1 lands past TRL's first log (step 10), whose
    # record the resume must not repeat, and 2 epochs are left to resume
    epochs, batch = 3, 4
    stage = {"type": "dpo", "pairs": "rollouts", "rollout_prompts": 64, "rollout_samples": 4,
             "rollout_max_tokens": 6, "rewards": RANKING_REWARDS, "reward_workers": 1, "held_out_pairs": 8,
             "learning_rate": 1e-4, "per_device_train_batch_size": batch, "num_train_epochs": epochs}
    cmd = quickstart_cmd(run_dir, NO_EVAL, recipe=stage_recipe(tmp_path / "recipe", stage))
    stage_dir = run_dir / "dpo"
    trainer_dir = stage_dir / "trainer"

    def complete_checkpoints() -> list[Path]:
        return [c for c in trainer_dir.glob("checkpoint-*") if (c / "trainer_state.json").exists()]

    run_until_killed(cmd, run_dir / "killed.log", lambda: bool(complete_checkpoints()))
    assert not (stage_dir / "stage.json").exists() and not (run_dir / "summary.json").exists()
    pairs_before = snapshot(stage_dir / "pairs.jsonl")
    rollouts_before = snapshot(stage_dir / "rollouts.json")
    pairs = len(jsonl(stage_dir / "pairs.jsonl"))
    expected = epochs * math.ceil((pairs - 8) / batch)
    checkpoint = max(complete_checkpoints(), key=lambda c: int(c.name.split("-")[1]))
    killed_step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    assert 0 < killed_step < expected, f"kill landed at step {killed_step} of {expected}"

    result = resume(cmd)
    assert snapshot(stage_dir / "pairs.jsonl") == pairs_before, "the cached pairs were rebuilt"
    assert snapshot(stage_dir / "rollouts.json") == rollouts_before
    assert "resuming DPO from" in result.stderr, result.stderr[-3000:]
    record = stage_record(run_dir, "dpo", "dpo")
    assert record["pairs"] == pairs and record["pairs_trained"] == pairs - 8 and record["held_out_pairs"] == 8
    assert record["resumed_from"] is not None and Path(record["resumed_from"]).name.startswith("checkpoint-")
    assert int(Path(record["resumed_from"]).name.split("-")[1]) >= killed_step
    assert record["steps"] == expected, f"{record['steps']} optimiser steps, expected {expected}"
    final = json.loads((trainer_dir / f"checkpoint-{expected}" / "trainer_state.json").read_text())
    assert final["global_step"] == expected and final["max_steps"] == expected
    logged = [e["step"] for e in final["log_history"] if "loss" in e]
    assert logged == sorted(set(logged)) == list(range(10, expected + 1, 10)), "TRL's logged steps repeat or skip"
    history = [h["step"] for h in record["history"]]
    assert history == sorted(set(history)), "the stage's history repeats a step"
    assert (stage_dir / "policy" / "model.safetensors").exists()
