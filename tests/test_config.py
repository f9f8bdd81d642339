"""Tests for the typed recipe loader: YAML + overrides, every validation error, to_dict, help."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from rlpost.config import config_help, load_config, setting, to_dict
from rlpost.errors import UserError


@dataclass
class Model:
    name: str = setting("tiny", "Model name.")
    layers: int = setting(2, "Number of layers.")
    data_dir: Optional[Path] = setting(None, "Local data directory.", path_must_exist=True)


@dataclass
class RL:
    learning_rate: float = setting(1e-5, "Learning rate.")
    use_kl: bool = setting(False, "Add a KL penalty.")
    loss_type: str = setting("grpo", "Loss.", choices=("grpo", "dapo", "dr_grpo"))
    precision: Literal["fp32", "bf16"] = setting("fp32", "Parameter dtype.")
    max_steps: int = setting(100, "Optimizer steps.")
    rewards: list[dict | str] = setting(["accuracy"], "Reward specs (name or mapping).")
    weights: dict[str, float] = setting({}, "Reward weights by name.")
    stop: list[str] = setting([], "Stop strings.")
    extras: list[Any] = setting([], "Anything.")
    shape: tuple[int, int] = setting((1, 2), "A pair.")


@dataclass
class Run:
    output_dir: Path = setting(Path("runs/x"), "Where the run writes.")
    seed: int = setting(0, "Random seed.")
    model: Model = setting(Model, "The model section.")
    rl: RL = setting(RL, "The RL section.")


@dataclass
class Needs:
    name: str = field(metadata={"help": "A required key."})


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- loading

def test_defaults_without_yaml():
    cfg = load_config(Run, None)
    assert cfg == Run()
    assert cfg.rl.rewards == ["accuracy"] and cfg.rl.rewards is not load_config(Run, None).rl.rewards


def test_yaml_values_nested_and_typed(tmp_path):
    path = write(tmp_path, """
output_dir: out/run1
seed: 7
model: {name: small, layers: 4, data_dir: %s}
rl:
  learning_rate: 1e-4
  use_kl: true
  precision: bf16
  rewards: [accuracy, {name: format, weight: 0.5}]
  weights: {accuracy: 1, format: 0.5}
  shape: [3, 4]
""" % tmp_path)
    cfg = load_config(Run, path)
    assert cfg.output_dir == Path("out/run1") and cfg.seed == 7
    assert cfg.model == Model("small", 4, tmp_path)
    assert cfg.rl.learning_rate == pytest.approx(1e-4) and isinstance(cfg.rl.learning_rate, float)
    assert cfg.rl.use_kl is True and cfg.rl.precision == "bf16"
    assert cfg.rl.rewards == ["accuracy", {"name": "format", "weight": 0.5}]
    assert cfg.rl.weights == {"accuracy": 1.0, "format": 0.5}
    assert isinstance(cfg.rl.weights["accuracy"], float)
    assert cfg.rl.shape == (3, 4)
    assert cfg.rl.loss_type == "grpo"  # unset keys keep their defaults


def test_overrides_nested_and_typed(tmp_path):
    path = write(tmp_path, "seed: 1\nrl: {learning_rate: 0.1, max_steps: 5}\n")
    cfg = load_config(Run, path, ["rl.learning_rate=1e-4", "seed=3", "rl.use_kl=true",
                                  "rl.stop=[a,b]", "model.name=big", "rl.weights.accuracy=2",
                                  "rl.max_steps=2e3"])
    assert cfg.seed == 3 and cfg.rl.learning_rate == pytest.approx(1e-4)
    assert cfg.rl.max_steps == 2000 and isinstance(cfg.rl.max_steps, int)
    assert cfg.rl.use_kl is True and cfg.rl.stop == ["a", "b"] and cfg.model.name == "big"
    assert cfg.rl.weights == {"accuracy": 2.0}


def test_override_mapping_replaces_section(tmp_path):
    path = write(tmp_path, "model: {name: small, layers: 8}\n")
    cfg = load_config(Run, path, ["model={layers: 3}"])
    assert cfg.model == Model(layers=3)


def test_later_override_wins():
    assert load_config(Run, None, ["seed=1", "seed=2"]).seed == 2


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(Run, write(tmp_path, "# nothing\n")) == Run()


# ----------------------------------------------------------------------------- errors

def test_unknown_nested_key_suggests_and_lists(tmp_path):
    path = write(tmp_path, "rl:\n  lerning_rate: 0.1\n")
    message = error_of(Run, path)
    assert message.startswith(f"{path}: unknown key 'rl.lerning_rate'")
    assert "(did you mean 'rl.learning_rate'?)" in message
    assert "valid keys in 'rl': learning_rate, use_kl" in message


def test_unknown_top_level_key_without_close_match(tmp_path):
    message = error_of(Run, write(tmp_path, "zzz: 1\n"))
    assert "unknown key 'zzz'" in message and "did you mean" not in message
    assert "valid keys at top level: output_dir, seed, model, rl" in message


def test_unknown_override_key_names_override():
    message = error_of(Run, None, ["rl.lerning_rate=1e-4"])
    assert message.startswith("override 'rl.lerning_rate=1e-4': unknown key 'rl.lerning_rate'")
    assert "did you mean 'rl.learning_rate'" in message


def test_override_into_non_section():
    message = error_of(Run, None, ["seed.x=1"])
    assert "override 'seed.x=1'" in message and "'seed' is not a section" in message


@pytest.mark.parametrize("override", ["seed", "rl.learning_rate", "=3", "rl..x=1"])
def test_malformed_override(override):
    message = error_of(Run, None, [override])
    assert f"override '{override}'" in message and "KEY=VALUE" in message


def test_override_value_not_yaml():
    message = error_of(Run, None, ["model.name=a: b: c"])
    assert "override 'model.name=a: b: c'" in message and "quote it" in message


@pytest.mark.parametrize("text, key, expected, given", [
    ("seed: 1.5", "seed", "expects int", "1.5 (float)"),
    ("seed: true", "seed", "expects int", "True (bool)"),
    ("rl: {learning_rate: fast}", "rl.learning_rate", "expects float", "'fast' (str)"),
    ("rl: {learning_rate: true}", "rl.learning_rate", "expects float", "True (bool)"),
    ("rl: {use_kl: 'yes'}", "rl.use_kl", "expects bool", "'yes' (str)"),
    ("rl: {use_kl: 1}", "rl.use_kl", "expects bool", "1 (int)"),
    ("model: {name: 3}", "model.name", "expects str", "3 (int)"),
    ("output_dir: 5", "output_dir", "expects path", "5 (int)"),
    ("rl: {precision: fp16}", "rl.precision", "expects one of 'fp32', 'bf16'", "'fp16' (str)"),
    ("rl: {stop: abc}", "rl.stop", "expects list[str]", "'abc' (str)"),
    ("rl: {stop: [a, 1]}", "rl.stop[1]", "expects str", "1 (int)"),
    ("rl: {rewards: [acc, 3]}", "rl.rewards[1]", "expects dict | str", "3 (int)"),
    ("rl: {weights: [1]}", "rl.weights", "expects dict[str, float]", "[1] (list)"),
    ("rl: {weights: {a: x}}", "rl.weights.a", "expects float", "'x' (str)"),
    ("rl: {shape: [1, 2, 3]}", "rl.shape", "expects tuple[int, int]", "[1, 2, 3] (list)"),
    ("rl: {max_steps: 1.5e2.0}", "rl.max_steps", "expects int", "'1.5e2.0' (str)"),
    ("rl: {max_steps: 1.5e0}", "rl.max_steps", "expects int", "'1.5e0' (str)"),
    ("model: 5", "model", "expects a mapping", "5 (int)"),
    ("model: {data_dir: 3}", "model.data_dir", "expects path | None", "3 (int)"),
])
def test_wrong_type_names_key_type_and_value(tmp_path, text, key, expected, given):
    path = write(tmp_path, text + "\n")
    message = error_of(Run, path)
    assert message.startswith(f"{path}: key '{key}' ")
    assert expected in message and f"got {given}" in message


def test_wrong_type_from_override_names_override():
    message = error_of(Run, None, ["rl.use_kl=maybe"])
    assert message.startswith("override 'rl.use_kl=maybe': key 'rl.use_kl' expects bool")


def test_choices_violation(tmp_path):
    path = write(tmp_path, "rl: {loss_type: dapoo}\n")
    message = error_of(Run, path)
    assert f"{path}: key 'rl.loss_type' must be one of 'grpo', 'dapo', 'dr_grpo'" in message
    assert "got 'dapoo'" in message and "did you mean 'dapo'" in message


def test_missing_path_names_key_and_path(tmp_path):
    missing = tmp_path / "nope"
    message = error_of(Run, None, [f"model.data_dir={missing}"])
    assert "key 'model.data_dir'" in message and str(missing) in message and "does not exist" in message


def test_required_key_missing():
    message = error_of(Needs, None)
    assert "required key 'name' is missing" in message
    assert load_config(Needs, None, ["name=x"]).name == "x"


def test_missing_yaml_file(tmp_path):
    path = tmp_path / "absent.yaml"
    message = error_of(Run, path)
    assert message.startswith(f"{path}: recipe file not found")


def test_yaml_syntax_error_names_path_and_line(tmp_path):
    path = write(tmp_path, "seed: 1\nrl:\n  learning_rate: [1, 2\n  use_kl: true\n")
    message = error_of(Run, path)
    assert message.startswith(f"{path}:") and "YAML syntax error" in message
    line = int(message[len(str(path)) + 1:].split(":")[0])
    assert line in (3, 4, 5)


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "seed: 1\nseed: 2\n")
    message = error_of(Run, path)
    assert message.startswith(f"{path}:2:") and "duplicate key 'seed'" in message


def test_top_level_must_be_mapping(tmp_path):
    message = error_of(Run, write(tmp_path, "- a\n- b\n"))
    assert "must be a mapping" in message and "got list" in message


def test_setting_rejects_default_outside_choices():
    with pytest.raises(ValueError):
        setting("x", "help", choices=("a", "b"))


# ----------------------------------------------------------------------------- to_dict and help

def test_to_dict_round_trips_through_yaml_and_json(tmp_path):
    cfg = load_config(Run, None, [f"model.data_dir={tmp_path}", "rl.rewards=[a, {name: b}]",
                                  "rl.weights={a: 0.5}", "seed=9"])
    data = to_dict(cfg)
    assert data["model"]["data_dir"] == str(tmp_path) and data["output_dir"] == "runs/x"
    assert data["rl"]["shape"] == [1, 2]
    json.dumps(data)
    path = write(tmp_path, yaml.safe_dump(data), "resolved.yaml")
    assert load_config(Run, path) == cfg


def test_config_help_lists_every_key():
    text = config_help(Run)
    for key in ["output_dir", "seed", "model.name", "model.layers", "model.data_dir",
                "rl.learning_rate", "rl.use_kl", "rl.loss_type", "rl.rewards", "rl.weights"]:
        assert any(line.startswith(key + " (") for line in text.splitlines()), key
    assert "rl.learning_rate (float, default 1e-05): Learning rate." in text
    assert "rl.loss_type (str, default 'grpo'): Loss. [choices: 'grpo', 'dapo', 'dr_grpo']" in text
    assert "model.data_dir (path | None, default None): Local data directory. [path must exist]" in text
    assert "rl: section RL  The RL section." in text
    assert "name (str, default required): A required key." in config_help(Needs)


@dataclass
class WithOptionalSection:
    model: Optional[Model] = setting(None, "An optional model section.")


def test_optional_section(tmp_path):
    assert load_config(WithOptionalSection, None).model is None
    assert load_config(WithOptionalSection, None, ["model.layers=5"]).model == Model(layers=5)
    message = error_of(WithOptionalSection, write(tmp_path, "model: {layers: x}\n"))
    assert "key 'model.layers' expects int" in message  # the nested key, not the section
    message = error_of(WithOptionalSection, write(tmp_path, "model: {layrs: 1}\n"))
    assert "unknown key 'model.layrs'" in message


def test_errors_are_plain_user_errors():
    with pytest.raises(UserError) as info:
        load_config(Run, None, ["seed=x"])
    assert type(info.value) is UserError and info.value.exit_code == 2
