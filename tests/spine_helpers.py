"""Shared settings for the tests that run the real quickstart entry point on a tiny model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "model.hidden_size=64", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
    "model.intermediate_size=64",
    "sft.demonstrations=200", "sft.max_epochs=1", "sft.min_epochs=1", "sft.validation_prompts=20",
    "sft.threads=1", "held_out_prompts=40",
    "rl.groups_per_step=4", "rl.group_size=4", "rl.eval_every=4", "rl.checkpoint_every=2",
    "rl.reward_workers=1",
]


def quickstart_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "rlpost.cli", "run", f"run_dir={run_dir}", *TINY, *overrides]


def copy_sft(sft_run: Path, run_dir: Path) -> None:
    """Reuse a finished SFT stage so a test only pays for the RL stage."""
    shutil.copytree(sft_run / "sft", run_dir / "sft")


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def make_tiny_sft_run(run_dir: Path) -> Path:
    """Run only the SFT stage of the quickstart (tiny model, 1 epoch) into `run_dir`."""
    cmd = quickstart_cmd(run_dir)
    code = (
        "from pathlib import Path; from recipes import quickstart as q; from rlpost.config import load_config; "
        f"cfg = load_config(q.QuickstartConfig, q.DEFAULT_RECIPE, {cmd[4:]!r}); "
        "Path(cfg.run_dir).mkdir(parents=True, exist_ok=True); "
        "q.sft_stage(cfg, q.build_task(cfg), Path(cfg.run_dir))"
    )
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "sft" / "policy" / "model.safetensors").exists()
    return run_dir
