"""`rlpost` CLI: user mistakes give exit code 2 and one line naming the key or path, before any work.

Each failing case passes `run_dir=<tmp>/run` and checks that the directory was never created; the
pipeline (`rlpost.pipeline.run_recipe`) is replaced by a function that fails the test if it is ever
reached, so every error here must come from loading and checking the recipe.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

import rlpost.pipeline as pipeline
import rlpost.stages as stages
from rewards.registry import REGISTRY
from rlpost.cli import main
from rlpost.commands.run import DEFAULT_RECIPE
from rlpost.errors import UserError
from rlpost.recipe import load_recipe

REAL_RUN_RECIPE = pipeline.run_recipe


class WorkStarted(Exception):
    pass


@pytest.fixture
def reached():
    """The recipes the (guarded) pipeline was handed."""
    return []


@pytest.fixture
def guarded(monkeypatch, tmp_path, reached):
    """Work in tmp_path; reaching the pipeline (or, through the real one, any work) raises WorkStarted."""
    monkeypatch.chdir(tmp_path)

    def run_recipe(recipe, *args, **kwargs):
        reached.append(recipe)
        raise WorkStarted

    def work(*args, **kwargs):
        raise WorkStarted

    monkeypatch.setattr(pipeline, "run_recipe", run_recipe)
    for name in ("initial_policy", "evaluate_point"):  # what the real run_recipe does first
        monkeypatch.setattr(pipeline, name, work)
    monkeypatch.setattr(stages, "STAGES", {k: dataclasses.replace(v, run=work) for k, v in stages.STAGES.items()})
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
        (["grpo.max_stepz=5"], ["unknown key 'grpo.max_stepz'", "grpo.max_steps"]),
        (["grpo.max_steps=many"], ["'grpo.max_steps'", "int", "many"]),
        (["grpo.max_steps"], ["'grpo.max_steps'", "malformed"]),
        (["=5"], ["'=5'", "malformed"]),
        (["grpo.rewards=[arithmetic_exact, no_such_reward]"], ["grpo.rewards", "'no_such_reward'"]),
        (["grpo.rewards=[{name: arithmetic_exact, weight: high}]"], ["grpo.rewards", "weight"]),
        (["grpo.rewards=[nosuchmodule.sub:f]"], ["grpo.rewards", "nosuchmodule.sub"]),
        (["data.task.reverse=maybe"], ["'data.task.reverse'", "bool"]),
        (["data.task.max_operand=ten"], ["'data.task.max_operand'", "int"]),
        (["sft.beta=0.1"], ["'beta'", "stage type 'grpo'", "not 'sft'"]),
        (["grpo.max_staleness=-1"], ["'grpo.max_staleness'", ">= 0", "-1"]),
        (["grpo.eval_steps=0"], ["'grpo.eval_steps'", ">= 1"]),
        (["grpo.save_steps=0"], ["'grpo.save_steps'", ">= 1"]),
        (["grpo.temperature=0"], ["'grpo.temperature'", "> 0"]),
        (["grpo.num_generations=1"], ["'grpo.num_generations'", ">= 2"]),
        (["sft.demonstrations=100000"], ["'sft.demonstrations'", "100400", "training prompts"]),
        (["grpo.max_completion_length=64"], ["'grpo.max_completion_length'", "64", "max_model_len"]),
        (["eval=[{benchmark: held_out, limit: 0}]"], ["'eval[0].limit'", ">= 1"]),
    ],
)
def test_bad_override_fails_before_any_work(guarded, reached, capsys, overrides, expected):
    run_dir = guarded / "run"
    message = run_error(capsys, ["run", f"run_dir={run_dir}", *overrides])
    for piece in expected:
        assert piece in message, (piece, message)
    assert not run_dir.exists() and reached == []


def write_recipe(directory, text: str):
    path = directory / "recipe.yaml"
    path.write_text(text)
    return path


TINY_MODEL = "model:\n  build: {hidden_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 1}\n"


def file_error(guarded, reached, capsys, text: str, names_recipe: bool = True) -> tuple[str, str]:
    """The one-line error of running the recipe `text`; it names the recipe file unless told otherwise."""
    recipe = write_recipe(guarded, text)
    message = run_error(capsys, ["run", str(recipe), f"run_dir={guarded / 'run'}"])
    assert str(recipe) in message or not names_recipe, message
    assert not (guarded / "run").exists() and reached == []
    return message, str(recipe)


def test_unknown_key_in_recipe_file(guarded, reached, capsys):
    message, _ = file_error(guarded, reached, capsys, TINY_MODEL + "seed: 1\nstages:\n"
                                             "  - {type: grpo, max_steps: 3, lerning_rate: 0.1}\n")
    assert "'grpo.lerning_rate'" in message and "grpo.learning_rate" in message


def test_wrong_type_in_recipe_file(guarded, reached, capsys):
    message, _ = file_error(guarded, reached, capsys, TINY_MODEL + "data:\n  task:\n    reverse: maybe\n"
                                             "stages: [{type: grpo}]\n")
    assert "'data.task.reverse'" in message and "bool" in message


def test_unknown_stage_type_in_recipe_file(guarded, reached, capsys):
    message, _ = file_error(guarded, reached, capsys, TINY_MODEL + "stages:\n  - {type: sft}\n  - {type: ppo2}\n")
    assert "stages[1]" in message and "'ppo2'" in message and "grpo" in message and "sft" in message


def test_stage_key_of_another_stage_in_recipe_file(guarded, reached, capsys):
    message, _ = file_error(guarded, reached, capsys, TINY_MODEL + "stages:\n  - {type: sft, beta: 0.1}\n"
                                             "  - {type: grpo}\n")
    assert "stages[0]" in message and "'beta'" in message and "stage type 'grpo'" in message


def test_recipe_without_stages(guarded, reached, capsys):
    message, _ = file_error(guarded, reached, capsys, TINY_MODEL + "seed: 1\n")
    assert "'stages'" in message


def test_model_path_without_config_json(guarded, reached, capsys):
    empty = guarded / "not-a-model"
    empty.mkdir()
    (empty / "weights.bin").write_text("")
    message, _ = file_error(guarded, reached, capsys, f"model: {{path: {empty}}}\nstages: [{{type: grpo}}]\n")
    assert "'model.path'" in message and str(empty) in message and "config.json" in message


def test_missing_recipe_file(guarded, reached, capsys):
    missing = guarded / "nowhere" / "recipe.yaml"
    message = run_error(capsys, ["run", str(missing), f"run_dir={guarded / 'run'}"])
    assert str(missing) in message and "not found" in message
    assert not (guarded / "run").exists()


# ---------------------------------------------------------------- dataset sources


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    from tests.bpe_model import build_bpe_model_dir

    return build_bpe_model_dir(tmp_path_factory.mktemp("bpe") / "model", corpus=["What is 2 + 3? 5", "hello"] * 8,
                               vocab_size=300, num_layers=1, hidden_size=64, num_heads=2, intermediate_size=64)


def dataset_recipe(bpe_model, data_file) -> str:
    return (f"model: {{path: {bpe_model}}}\ndata: {{source: {data_file}}}\neval: []\n"
            "stages: [{type: grpo, max_steps: 2}]\n")


def test_dataset_row_without_prompt_column(guarded, reached, capsys, bpe_model):
    data = guarded / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5"}) + "\n"
                    + json.dumps({"question": "What is 1 + 1?", "answer": "2"}) + "\n")
    message, _ = file_error(guarded, reached, capsys, dataset_recipe(bpe_model, data),
                            names_recipe=False)  # it names the data file instead
    assert str(data) in message and "row 1" in message and "'prompt'" in message


def test_dataset_file_that_is_not_utf8(guarded, reached, capsys, bpe_model):
    data = guarded / "latin1.jsonl"
    data.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    message, _ = file_error(guarded, reached, capsys, dataset_recipe(bpe_model, data),
                            names_recipe=False)  # it names the data file instead
    assert str(data) in message and "UTF-8" in message and "line 2" in message


def test_valid_dataset_recipe_reaches_the_pipeline(guarded, reached, bpe_model):
    """The control for the two cases above."""
    data = guarded / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5"}) + "\n")
    with pytest.raises(WorkStarted):
        main(["run", str(write_recipe(guarded, dataset_recipe(bpe_model, data))),
              f"run_dir={guarded / 'run'}"])
    assert len(reached) == 1


# ---------------------------------------------------------------- controls and resume


def test_valid_recipe_reaches_the_pipeline(guarded, reached):
    """The control for the cases above: a valid config (registered name + dotted path) starts work."""
    run_dir = guarded / "run"
    rewards = "grpo.rewards=[arithmetic_exact, {name: 'rlpost.tasks.arithmetic:exact_match_reward', weight: 0.5}]"
    with pytest.raises(WorkStarted):
        main(["run", f"run_dir={run_dir}", rewards])
    (recipe,) = reached
    assert str(recipe.run_dir) == str(run_dir)
    assert [e.name for e in recipe.stage_entries] == ["sft", "grpo"]
    assert recipe.grpo.rewards[1] == {"name": "rlpost.tasks.arithmetic:exact_match_reward", "weight": 0.5}


def test_resume_with_a_changed_recipe_is_refused(guarded, capsys, monkeypatch):
    run_dir = guarded / "run"
    run_dir.mkdir()
    pipeline._check_same_recipe(run_dir, load_recipe(DEFAULT_RECIPE, [f"run_dir={run_dir}"]))
    assert (run_dir / "recipe.json").exists()
    monkeypatch.setattr(pipeline, "run_recipe", REAL_RUN_RECIPE)  # its first check is the one under test
    message = run_error(capsys, ["run", f"run_dir={run_dir}", "seed=5"])
    assert "seed" in message and str(run_dir) in message
    assert sorted(p.name for p in run_dir.iterdir()) == ["recipe.json"]
    # the control: the unchanged recipe passes the check and reaches work
    with pytest.raises(WorkStarted):
        main(["run", f"run_dir={run_dir}"])


def test_a_stage_key_added_by_a_newer_rlpost_at_its_default_does_not_block_a_resume(tmp_path):
    """A run directory written before `grpo.lora` existed resumes when the key is at its default (None);
    setting it is still a changed recipe."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recipe = load_recipe(DEFAULT_RECIPE, [f"run_dir={run_dir}"])
    pipeline._check_same_recipe(run_dir, recipe)
    old = json.loads((run_dir / "recipe.json").read_text())
    assert old.pop("grpo.lora") is None
    (run_dir / "recipe.json").write_text(json.dumps(old))
    pipeline._check_same_recipe(run_dir, recipe)  # the older run's directory: accepted
    with pytest.raises(UserError, match="grpo.lora"):
        pipeline._check_same_recipe(run_dir, load_recipe(DEFAULT_RECIPE, [f"run_dir={run_dir}", "grpo.lora={r: 4}"]))


def test_rewards_list_prints_every_registered_name(capsys):
    assert main(["rewards", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert sorted(names) == sorted(REGISTRY)
    arithmetic = next(line for line in lines if line.startswith("arithmetic_exact "))
    assert "Addition task" in arithmetic
