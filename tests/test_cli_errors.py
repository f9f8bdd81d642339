"""`rlpost` CLI: user mistakes give exit code 2 and one line naming the key or path, before any work.

Each failing case passes `run_dir=<tmp>/run` and checks that the directory was never created; the
stages are replaced by functions that fail the test if they are ever reached.
"""

from __future__ import annotations

import pytest

from recipes import quickstart
from rewards.registry import REGISTRY
from rlpost.cli import main


class WorkStarted(Exception):
    pass


@pytest.fixture
def guarded(monkeypatch, tmp_path):
    """Work in tmp_path; any stage being reached raises WorkStarted."""
    monkeypatch.chdir(tmp_path)

    def stage(*args, **kwargs):
        raise WorkStarted

    for name in ("sft_stage", "rl_stage", "report_stage"):
        monkeypatch.setattr(quickstart, name, stage)
    return tmp_path


def run_error(capsys, args: list[str]) -> str:
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rlpost run: error: "), err
    assert "Traceback" not in err and out == ""
    return lines[0]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["rl.max_stepz=5"], ["unknown key 'rl.max_stepz'", "rl.max_steps"]),
        (["rl.max_steps=many"], ["'rl.max_steps'", "int", "many"]),
        (["rl.max_steps"], ["'rl.max_steps'", "malformed"]),
        (["=5"], ["'=5'", "malformed"]),
        (["rl.rewards=[arithmetic_exact, no_such_reward]"], ["rl.rewards", "'no_such_reward'"]),
        (["rl.rewards=[{name: arithmetic_exact, weight: high}]"], ["rl.rewards", "weight"]),
        (["rl.rewards=[nosuchmodule.sub:f]"], ["rl.rewards", "nosuchmodule.sub"]),
    ],
)
def test_bad_override_fails_before_any_work(guarded, capsys, overrides, expected):
    run_dir = guarded / "run"
    message = run_error(capsys, ["run", f"run_dir={run_dir}", *overrides])
    for piece in expected:
        assert piece in message, (piece, message)
    assert not run_dir.exists()


def test_unknown_key_in_recipe_file(guarded, capsys):
    recipe = guarded / "recipe.yaml"
    recipe.write_text("seed: 1\nrl:\n  max_steps: 3\n  lerning_rate: 0.1\n")
    message = run_error(capsys, ["run", str(recipe), f"run_dir={guarded / 'run'}"])
    assert str(recipe) in message and "'rl.lerning_rate'" in message and "rl.learning_rate" in message
    assert not (guarded / "run").exists()


def test_wrong_type_in_recipe_file(guarded, capsys):
    recipe = guarded / "recipe.yaml"
    recipe.write_text("task:\n  reverse: maybe\n")
    message = run_error(capsys, ["run", str(recipe), f"run_dir={guarded / 'run'}"])
    assert "'task.reverse'" in message and "bool" in message
    assert not (guarded / "run").exists()


def test_missing_recipe_file(guarded, capsys):
    missing = guarded / "nowhere" / "recipe.yaml"
    message = run_error(capsys, ["run", str(missing), f"run_dir={guarded / 'run'}"])
    assert str(missing) in message and "not found" in message
    assert not (guarded / "run").exists()


def test_valid_recipe_reaches_the_first_stage(guarded):
    """The control for the cases above: a valid config (registered name + dotted path) starts work."""
    run_dir = guarded / "run"
    rewards = "rl.rewards=[arithmetic_exact, {name: 'rlpost.tasks.arithmetic:exact_match_reward', weight: 0.5}]"
    with pytest.raises(WorkStarted):
        main(["run", f"run_dir={run_dir}", rewards])
    assert (run_dir / "config.json").exists()


def test_rewards_list_prints_every_registered_name(capsys):
    assert main(["rewards", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert sorted(names) == sorted(REGISTRY)
    arithmetic = next(line for line in lines if line.startswith("arithmetic_exact "))
    assert "Addition task" in arithmetic
