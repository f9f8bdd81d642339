"""`rlpost run` on two learner ranks: `accelerate launch --config_file recipes/accelerate/ddp_cpu.yaml
-m rlpost.cli run ...` trains a GRPO stage data parallel (DDP, gloo), with the rollouts, evaluations,
logs and checkpoints on the main rank; stages that cannot train on several ranks are refused first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.spine_helpers import QUICKSTART, REPO, TINY, copy_sft
from tests.test_distributed_learner import DDP_CPU, _free_port


def _launch(run_dir: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [str(accelerate), "launch", "--config_file", str(DDP_CPU), "--main_process_port", str(_free_port()),
           "-m", "rlpost.cli", "run", f"run_dir={run_dir}", *TINY, *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def test_a_grpo_stage_trains_on_two_learner_ranks(sft_run, tmp_path):
    run_dir = tmp_path / "run"
    copy_sft(sft_run, run_dir)
    (run_dir / "evals").mkdir()  # the same eval entry on the same policies: only the one after grpo runs here
    for point in ("initial", "sft"):
        (run_dir / "evals" / f"{point}.json").write_text((sft_run / "evals" / f"{point}.json").read_text())
    result = _launch(run_dir, "grpo.max_steps=4", "grpo.max_staleness=0")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["train/processes"] == 2.0 for r in steps)  # the update ran through DDP on both ranks
    assert all(r["train/samples"] == 16.0 for r in steps)   # whole-batch counts (4 prompts x 4), summed over ranks
    # the engines generate with what rank 0 trained: vLLM's logprobs against the learner's after the last sync
    assert steps[-1]["sync/logprob_mismatch_max"] <= 1e-3
    ledger = [json.loads(line) for line in (run_dir / "grpo" / "ledger.jsonl").read_text().splitlines()]
    assert [e["step"] for e in ledger] == [1, 2, 3, 4]
    assert [i for e in ledger for i in e["prompt_indices"]] == list(range(16))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["points"] == ["initial", "sft", "grpo"]
    assert (run_dir / "evals" / "grpo.json").exists()  # evaluated in a process the main rank spawned
    assert summary["stages"]["grpo"]["type"] == "grpo"
    assert (run_dir / "grpo" / "policy" / "model.safetensors").exists()
    assert (run_dir / "grpo" / "checkpoints").is_dir()


@pytest.mark.parametrize("overrides, names", [
    ((), "stage 'sft' is a sft stage"),
    (("grpo.lora={r: 4}",), "a LoRA grpo stage"),
    (("grpo.prompts_per_step=3",), "'grpo.prompts_per_step' (3) must divide by steps_per_generation x learner processes (1 x 2)"),
])
def test_stages_that_cannot_train_on_several_ranks_are_refused(sft_run, tmp_path, overrides, names):
    from rlpost.errors import UserError
    from rlpost.pipeline import check_stages_for_ranks
    from rlpost.recipe import load_recipe

    run_dir = tmp_path / "run"
    if overrides:
        copy_sft(sft_run, run_dir)
        (run_dir / "sft" / "stage.json").write_text((sft_run / "sft" / "stage.json").read_text())
    recipe = load_recipe(QUICKSTART, [f"run_dir={run_dir}", *TINY, *overrides])
    with pytest.raises(UserError, match=names.replace("(", r"\(").replace(")", r"\)")):
        check_stages_for_ranks(recipe, 2)
