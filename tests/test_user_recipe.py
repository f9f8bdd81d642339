"""A user's own recipe through `rlpost run`: a local model directory, a JSONL dataset with a column
mapping, SFT on a completion column, GRPO with a custom reward named by dotted path that reads a
dataset column, and evaluation on the user's own held-out file scored by that same function."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.bpe_model import build_bpe_model_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
REWARD = "tests.reward_fixtures:target_in_completion_reward"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_user_dataset_and_dotted_reward_run_end_to_end(tmp_path):
    rows = [{"question": f"Say the word number {i}.", "target": f"w{i % 5}"} for i in range(24)]
    model = build_bpe_model_dir(tmp_path / "model", corpus=[r["question"] + " " + r["target"] for r in rows] * 5,
                                vocab_size=300)
    recipe = {
        "run_dir": str(tmp_path / "run"),
        "model": {"path": str(model), "dtype": "float32", "max_model_len": 256},
        "data": {"source": str(write_jsonl(tmp_path / "train.jsonl", rows[:16])), "columns": {"prompt": "question"},
                 "prompt": {"chat_template": True, "system_prompt": "Reply with one word."}},
        "eval": [{"benchmark": str(write_jsonl(tmp_path / "held.jsonl", rows[16:])), "verifier": REWARD,
                  "columns": {"prompt": "question"}, "max_tokens": 6}],
        "stages": [
            {"type": "sft", "num_train_epochs": 1, "completion_column": "target", "demonstrations": None,
             "per_device_train_batch_size": 4},
            {"type": "grpo", "max_steps": 2, "prompts_per_step": 2, "num_generations": 2, "max_completion_length": 6,
             "rewards": [REWARD], "reward_workers": 1, "save_steps": 1, "eval_steps": 2},
        ],
    }
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = subprocess.run([sys.executable, "-m", "rlpost.cli", "run", str(path)], cwd=REPO, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["evaluations"]["held"]["points"]) == ["initial", "sft", "grpo"]
    assert summary["evaluations"]["held"]["points"]["grpo"]["n"] == 8
    assert summary["stages"]["sft"]["demonstrations"] == 16
    metrics = [json.loads(line) for line in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    tag = "reward/tests.reward_fixtures_target_in_completion_reward"
    last = [m for m in metrics if f"{tag}/calls" in m][-1]
    assert last[f"{tag}/calls"] >= 2 and last[f"{tag}/exceptions"] == 0  # the 'target' column reached it
