"""Shared settings for the tests that run the real `rlpost run` entry point on a tiny model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

TINY = [
    "model.build.hidden_size=64", "model.build.num_layers=1", "model.build.num_heads=2",
    "model.build.num_kv_heads=1", "model.build.intermediate_size=64",
    "sft.demonstrations=200", "sft.num_train_epochs=1", "sft.validation_prompts=20",
    "eval=[{benchmark: held_out, limit: 40}]",
    "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.eval_steps=4", "grpo.save_steps=2",
    "grpo.reward_workers=1",
]
SFT_ONLY_TINY = [o for o in TINY if not o.startswith("grpo.")]
# For a run whose test reads no evaluation: no held-out evaluation at any point or during a stage (no
# vLLM engine for it); the RL stages' vLLM/learner logprob probe still runs every eval_steps.
NO_EVAL = "eval=[]"


def quickstart_cmd(run_dir: Path, *overrides: str, recipe: Path | None = None) -> list[str]:
    """`rlpost run [recipe] run_dir=... TINY... overrides...` (default recipe: recipes/quickstart.yaml)."""
    head = [str(recipe)] if recipe is not None else []
    tiny = TINY if recipe is None else SFT_ONLY_TINY
    return [sys.executable, "-m", "rlpost.cli", "run", *head, f"run_dir={run_dir}", *tiny, *overrides]


def copy_sft(sft_run: Path, run_dir: Path, evals: bool = False) -> None:
    """Reuse a finished SFT stage (and the built initial model) so a test only pays for the RL stage.

    recipe.json is not copied: the full recipe differs from the SFT-only one. evals/ is copied only
    with `evals=True`, for a run whose `eval` entries are TINY's, as the SFT-only run's are: its
    evaluations at 'initial' and 'sft' are then those of the same entries on the same policies, so
    the run evaluates only its own stage (in-stage and after it), not those two again (two vLLM
    engine starts fewer)."""
    shutil.copytree(sft_run / "sft", run_dir / "sft")
    shutil.copytree(sft_run / "initial", run_dir / "initial")
    if evals:
        (run_dir / "evals").mkdir(parents=True)
        for point in ("initial", "sft"):
            shutil.copy2(sft_run / "evals" / f"{point}.json", run_dir / "evals" / f"{point}.json")


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def sft_only_recipe(directory: Path) -> Path:
    """recipes/quickstart.yaml's model, data and eval with only its sft stage, written to `directory`."""
    full = yaml.safe_load(QUICKSTART.read_text())
    sft = [s for s in full["stages"] if s["type"] == "sft"]
    assert len(sft) == 1, full["stages"]
    recipe = {k: full[k] for k in ("seed", "model", "data", "eval") if k in full}
    recipe["stages"] = sft
    path = Path(directory) / "sft-only.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def make_tiny_sft_run(run_dir: Path) -> Path:
    """Run the real CLI on the quickstart with only its SFT stage (tiny model, 1 epoch) into `run_dir`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = sft_only_recipe(run_dir)
    result = run(quickstart_cmd(run_dir, recipe=recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "sft" / "policy" / "model.safetensors").exists()
    assert (run_dir / "sft" / "stage.json").exists()
    assert (run_dir / "initial" / "policy" / "config.json").exists()
    return run_dir
