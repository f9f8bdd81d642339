"""Tests for the reward registry: resolve by name and dotted path, specs, listing, UserErrors."""

from __future__ import annotations

import os.path

import pytest

from rewards import registry
from rewards.registry import RewardSpec, describe, list_rewards, parse_reward_specs, resolve
from rlpost.errors import UserError

try:
    import reward_fixtures as fx
except ImportError:  # tests/ collected as a package
    from tests import reward_fixtures as fx

FX = fx.__name__


def test_registry_holds_the_builtin_paths():
    assert registry.REGISTRY == {
        "math_accuracy": "rewards.math_verifier:math_accuracy_reward",
        "code_tests": "rewards.code_verifier:code_tests_reward",
        "ifeval_strict": "rewards.ifeval:ifeval_strict_reward",
        "ifeval_loose": "rewards.ifeval:ifeval_loose_reward",
        "format_tags": "rewards.shaping:format_tags_reward",
        "format_regex": "rewards.shaping:format_regex_reward",
        "overlong_penalty": "rewards.shaping:overlong_penalty_reward",
        "arithmetic_exact": "rewards.arithmetic:exact_match_reward",
        "reward_model": "rewards.reward_model:reward_model_reward",
    }


def test_resolve_registered_name(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "fixture_length", f"{FX}:length_reward")
    assert resolve("fixture_length") is fx.length_reward


@pytest.mark.parametrize("path", [f"{FX}:length_reward", f"{FX}.length_reward"])
def test_resolve_dotted_paths(path):
    assert resolve(path) is fx.length_reward


def test_resolve_nested_attribute():
    assert resolve("os:path.join") is os.path.join


def test_unknown_name_lists_registered_names_and_dotted_paths():
    with pytest.raises(UserError) as info:
        resolve("no_such_reward")
    message = str(info.value)
    assert "'no_such_reward'" in message
    for name in registry.REGISTRY:
        assert name in message
    assert "dotted import path" in message and "\n" not in message


@pytest.mark.parametrize(
    "path, words",
    [
        ("no_such_module_qq:f", ["no_such_module_qq", "cannot import"]),
        (f"{FX}:missing_fn", ["has no attribute", "missing_fn"]),
        (f"{FX}:NOT_CALLABLE", ["int", "not a function"]),
        (":f", ["pkg.mod:func"]),
        ("", ["non-empty"]),
    ],
)
def test_resolve_errors(path, words):
    with pytest.raises(UserError) as info:
        resolve(path)
    for word in words:
        assert word in str(info.value)


def test_parse_names_and_mappings():
    specs = parse_reward_specs(["a.b:c", {"name": "d.e:f", "weight": 2, "timeout_s": 0.5}])
    assert specs == [RewardSpec("a.b:c", 1.0, 10.0), RewardSpec("d.e:f", 2, 0.5)]
    assert parse_reward_specs("math_accuracy") == [RewardSpec("math_accuracy")]


@pytest.mark.parametrize(
    "value, words",
    [
        (["ok.m:f", {"weight": 1.0}], ["rewards[1]", "missing key 'name'"]),
        ([{"name": "m:f", "wieght": 1.0}], ["rewards[0]", "'wieght'", "allowed"]),
        ([{"name": "m:f", "weight": "high"}], ["rewards[0]", "weight", "'high'"]),
        ([{"name": "m:f", "weight": float("nan")}], ["rewards[0]", "finite"]),
        ([{"name": "m:f", "timeout_s": 0}], ["rewards[0]", "timeout_s", "positive"]),
        ([{"name": "m:f", "timeout_s": True}], ["rewards[0]", "timeout_s"]),
        (["m:f", 7], ["rewards[1]", "7"]),
        (["m:f", "m:f"], ["rewards[1]", "listed twice"]),
        ([], ["non-empty"]),
        (5, ["non-empty"]),
    ],
)
def test_parse_errors_name_the_entry(value, words):
    with pytest.raises(UserError) as info:
        parse_reward_specs(value)
    for word in words:
        assert word in str(info.value)


def test_list_rewards_describes_or_explains(monkeypatch):
    monkeypatch.setattr(registry, "REGISTRY", {
        "fixture_length": f"{FX}:length_reward",
        "broken": "no_such_module_qq:f",
    })
    rows = dict(list_rewards())
    assert list(rows) == ["broken", "fixture_length"]
    assert rows["fixture_length"] == "Length of each completion in characters."
    assert rows["broken"].startswith("unavailable: ") and "no_such_module_qq" in rows["broken"]


def test_describe_without_docstring():
    assert describe(lambda: None) == ""
