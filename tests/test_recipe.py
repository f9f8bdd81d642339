"""Recipes (`rlpost.recipe`): the default recipe loads, stages are addressed by name, every key has
help, and the flat settings a resume compares are exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlpost.errors import UserError
from rlpost.recipe import EvalSpec, StageEntry, changed_keys, flat_settings, load_recipe, recipe_help

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

NAMED = """\
model:
  build: {hidden_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 1}
eval: [{benchmark: held_out, limit: 10}]
stages:
  - {type: sft, name: warmup, demonstrations: 100, validation_prompts: 10}
  - {type: grpo, name: rl1, max_steps: 3}
  - {type: grpo, name: rl2}
"""


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_quickstart_recipe_loads_with_its_values():
    recipe = load_recipe(QUICKSTART)
    assert recipe.stage_entries == [StageEntry("sft", "sft"), StageEntry("grpo", "grpo")]
    assert recipe.source == str(QUICKSTART)
    assert str(recipe.run_dir) == "runs/quickstart" and recipe.seed == 0
    assert recipe.model.path is None and recipe.model.build.hidden_size == 256
    assert recipe.model.build.max_positions == 64
    assert recipe.data.source == "task" and recipe.data.task.held_out_percent == 12  # not the default 10
    assert [(e.benchmark, e.limit, e.label) for e in recipe.eval] == [("held_out", 1000, "held_out")]
    assert (recipe.sft.learning_rate, recipe.sft.demonstrations, recipe.sft.patience) == (1e-3, 8000, 4)
    assert (recipe.grpo.max_steps, recipe.grpo.num_generations, recipe.grpo.prompts_per_step) == (100, 16, 8)
    assert recipe.grpo.rewards == ["arithmetic_exact"]


def test_overrides_of_the_quickstart():
    recipe = load_recipe(QUICKSTART, ["grpo.max_steps=5", "sft.num_train_epochs=1", "model.build.hidden_size=64",
                                      "eval=[{benchmark: held_out, limit: 40}]", "data.task.reverse=false"])
    assert recipe.grpo.max_steps == 5 and recipe.sft.num_train_epochs == 1
    assert recipe.model.build.hidden_size == 64 and recipe.model.build.num_layers == 2  # the rest is kept
    assert recipe.data.task.reverse is False
    assert len(recipe.eval) == 1 and recipe.eval[0].limit == 40 and recipe.eval[0].n_samples == 1


def test_overrides_address_stages_by_name(tmp_path):
    path = write(tmp_path, NAMED)
    recipe = load_recipe(path, ["rl2.max_steps=7", "warmup.num_train_epochs=2", "rl1.beta=0.1"])
    assert [(e.name, e.type) for e in recipe.stage_entries] == [("warmup", "sft"), ("rl1", "grpo"), ("rl2", "grpo")]
    assert (recipe.rl1.max_steps, recipe.rl2.max_steps) == (3, 7)
    assert (recipe.rl1.beta, recipe.rl2.beta) == (0.1, 0.0)  # two stages of one type are independent
    assert recipe.warmup.num_train_epochs == 2 and recipe.warmup.demonstrations == 100
    with pytest.raises(UserError, match=r"unknown key 'grpo'.*rl1, rl2"):  # the type is not a stage name
        load_recipe(path, ["grpo.max_steps=5"])
    with pytest.raises(UserError, match=r"'beta' belongs to stage type 'grpo', not 'sft'"):
        load_recipe(path, ["warmup.beta=0.1"])
    with pytest.raises(UserError, match=r"stage 'rl2' needs learning_rate > 0"):
        load_recipe(path, ["rl2.learning_rate=0"])


@pytest.mark.parametrize("stages, expected", [
    ("[{type: grpo}, {type: grpo}]", r"stages\[1\]: stage name 'grpo' is taken"),
    ("[{type: sft, name: model}]", r"stages\[0\]: stage name 'model' is taken"),
    ("[{type: grpoo}]", r"unknown stage type 'grpoo' \(did you mean 'grpo'\?\)"),
    ("[{name: x}]", r"stages\[0\] must be a mapping with a 'type'"),
    ("[]", r"'stages' must be a non-empty list"),
])
def test_bad_stage_lists(tmp_path, stages, expected):
    path = write(tmp_path, f"model: {{build: {{hidden_size: 64, num_heads: 2}}}}\nstages: {stages}\n")
    with pytest.raises(UserError, match=expected) as err:
        load_recipe(path)
    assert str(path) in str(err.value)


def test_help_config_lists_stage_keys_with_help():
    text = recipe_help(QUICKSTART)
    lines = {line.split(" ", 1)[0]: line for line in text.splitlines()}
    assert "grpo.max_steps" in lines and "sft.learning_rate" in lines
    assert "int" in lines["grpo.max_steps"] and "optimiser steps" in lines["grpo.max_steps"]
    assert "float" in lines["sft.learning_rate"] and "AdamW" in lines["sft.learning_rate"]
    for key in ("model.build.hidden_size", "data.task.max_operand", "grpo.num_generations", "sft.patience"):
        assert key in lines and lines[key].split("): ", 1)[1].strip(), key  # every key has help text


def test_help_config_follows_the_recipes_stage_names(tmp_path):
    text = recipe_help(write(tmp_path, NAMED))
    keys = {line.split(" ", 1)[0] for line in text.splitlines()}
    assert {"warmup.learning_rate", "rl1.max_steps", "rl2.max_steps"} <= keys
    assert "grpo.max_steps" not in keys and "sft.learning_rate" not in keys


def test_flat_settings_of_a_recipe(tmp_path):
    recipe = load_recipe(write(tmp_path, NAMED), ["data.columns={prompt: question}"])
    flat = flat_settings(recipe)
    assert flat["stages"] == ["warmup:sft", "rl1:grpo", "rl2:grpo"]
    assert flat["rl1.max_steps"] == 3 and flat["rl2.max_steps"] == 100 and flat["warmup.demonstrations"] == 100
    assert flat["model.build.hidden_size"] == 64 and flat["model.path"] is None
    assert flat["data.columns"] == {"prompt": "question"}  # kept whole: its keys are the user's
    assert "data.columns.prompt" not in flat
    assert flat["eval"] == [{"benchmark": "held_out", "name": None, "limit": 10, "max_tokens": None,
                             "verifier": None, "columns": {}, "n_samples": 1, "temperature": 0.0}]
    assert not any(isinstance(v, dict) and k != "data.columns" for k, v in flat.items())


def test_changed_keys_by_hand():
    old = {"seed": 0, "grpo.max_steps": 100, "run_dir": "a", "stages": ["sft:sft", "grpo:grpo"], "gone": 1}
    new = {"seed": 0, "grpo.max_steps": 50, "run_dir": "b", "stages": ["grpo:grpo"], "added": None}
    assert changed_keys(old, new) == ["added", "gone", "grpo.max_steps", "run_dir", "stages"]
    assert changed_keys(old, new, ignore=("run_dir",)) == ["added", "gone", "grpo.max_steps", "stages"]
    assert changed_keys(old, dict(old)) == []
    assert changed_keys({"x": None}, {}) == ["x"]  # an absent key differs from an explicit null
    assert changed_keys({"x": [1, 2]}, {"x": [2, 1]}) == ["x"]


def test_changed_keys_between_loaded_recipes():
    base = flat_settings(load_recipe(QUICKSTART))
    assert changed_keys(base, flat_settings(load_recipe(QUICKSTART))) == []
    other = flat_settings(load_recipe(QUICKSTART, ["seed=5", "grpo.beta=0.01", "run_dir=elsewhere"]))
    assert changed_keys(base, other, ignore=("run_dir",)) == ["grpo.beta", "seed"]


def test_eval_labels():
    assert EvalSpec(benchmark="gsm8k").label == "gsm8k"
    assert EvalSpec(benchmark="gsm8k", name="math").label == "math"
    assert EvalSpec(benchmark="data/held.jsonl", verifier="math").label == "held"
