"""recipes/gsm8k_grpo.yaml end to end on a locally built BPE Qwen2 with a chat template (no hub).

The real recipe runs for a few steps: chat-templated prompts with the system prompt, the GSM8K
`answer` column reaching math_accuracy, the format reward with recipe args, evaluation on GSM8K
test before and after the stage, checkpoints; then the finished run's command returns at once,
and a run whose RL stage was interrupted after its last checkpoint resumes and finishes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlpost.data import read_rows
from tests.bpe_model import build_bpe_model_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.dtype=float32", "model.max_model_len=768", "model.threads=1",
         "eval=[{benchmark: gsm8k, limit: 6, max_tokens: 8}]",
         "grpo.max_steps=2", "grpo.prompts_per_step=2", "grpo.num_generations=2",
         "grpo.max_completion_length=8", "grpo.save_steps=1", "grpo.eval_steps=2", "grpo.reward_workers=1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    corpus = [r["question"] + " " + r["solution"] for r in read_rows("gsm8k-train")[:400]]
    return build_bpe_model_dir(tmp_path_factory.mktemp("bpe") / "model", corpus=corpus, vocab_size=512,
                               max_positions=1024)


def rlpost_run(run_dir: Path, model_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlpost.cli", "run", "recipes/gsm8k_grpo.yaml", f"model.path={model_dir}",
           f"run_dir={run_dir}", *SMALL]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_gsm8k_recipe_end_to_end_and_resume(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = rlpost_run(run_dir, model_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    points = summary["evaluations"]["gsm8k"]["points"]
    assert list(points) == ["initial", "grpo"] and all(p["n"] == 6 for p in points.values())
    assert summary["stages"]["grpo"]["steps"] == 2 and summary["stages"]["grpo"]["samples_trained"] == 8
    ledger = [json.loads(line) for line in (run_dir / "grpo" / "ledger.jsonl").read_text().splitlines()]
    assert [row["step"] for row in ledger] == [1, 2]
    metrics = [json.loads(line) for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    calls = [m for m in metrics if "reward/math_accuracy/calls" in m]
    assert calls and calls[-1]["reward/math_accuracy/exceptions"] == 0  # the answer column reached it
    assert calls[-1]["reward/format_regex/exceptions"] == 0  # its recipe args reached it
    assert (run_dir / "grpo" / "policy" / "model.safetensors").exists()
    assert list((run_dir / "grpo" / "checkpoints").glob("step-*"))

    start = time.perf_counter()  # a finished run: says so and exits 0 within seconds
    again = rlpost_run(run_dir, model_dir)
    assert again.returncode == 0 and "is complete" in again.stdout
    assert time.perf_counter() - start < 60

    # interrupted after the stage's last checkpoint, before it was marked done: resumes and finishes
    for path in (run_dir / "summary.json", run_dir / "grpo" / "stage.json", run_dir / "evals" / "grpo.json"):
        path.unlink()
    resumed = rlpost_run(run_dir, model_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (run_dir / "grpo" / "ledger.jsonl").read_text().splitlines()] == [1, 2]
