"""Reward functions by registered name or dotted import path, with weights.

A reward function follows TRL's convention and is called by keyword::

    f(prompts, completions, completion_ids, **dataset_columns) -> list[float | None]

It returns one value per completion; ``None`` means "not applicable to this sample".
It may be ``async def``; the reward pool then runs it with ``asyncio.run`` in its worker.

Functions are named either by a key of ``REGISTRY`` (e.g. ``math_accuracy``) or by a
dotted import path (``pkg.mod:func`` or ``pkg.mod.func``). Registered modules are imported
lazily, so a missing optional dependency only matters to the reward that needs it.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from rewards.errors import UserError

REGISTRY: dict[str, str] = {
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

_PATH_HELP = "or give a dotted import path such as 'mypkg.rewards:my_reward'"


def _split_path(path: str) -> tuple[str, str]:
    """Split ``pkg.mod:attr`` or ``pkg.mod.attr`` into (module, attribute)."""
    if ":" in path:
        module, _, attr = path.partition(":")
    else:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise UserError(f"reward path {path!r} is not of the form 'pkg.mod:func' or 'pkg.mod.func'")
    return module, attr


def _import_attr(path: str, shown: str) -> Any:
    module_name, attr = _split_path(path)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"reward {shown!r}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"reward {shown!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def resolve(name_or_path: str) -> Callable[..., Any]:
    """Return the reward function for a registered name or a dotted import path.

    Raises UserError for an unknown name, a module that cannot be imported, a missing
    attribute, or an attribute that is not callable.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UserError(f"reward name must be a non-empty string, got {name_or_path!r}")
    name = name_or_path.strip()
    if name in REGISTRY:
        path = REGISTRY[name]
    elif ":" in name or "." in name:
        path = name
    else:
        known = ", ".join(sorted(REGISTRY))
        raise UserError(f"unknown reward {name!r}: use one of {known}, {_PATH_HELP}")
    func = _import_attr(path, name)
    if not callable(func):
        raise UserError(f"reward {name!r}: {path!r} is a {type(func).__name__}, not a function")
    return func


def describe(func: Callable[..., Any]) -> str:
    """First line of the function's docstring ('' when it has none)."""
    doc = (getattr(func, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def list_rewards() -> list[tuple[str, str]]:
    """Registered reward names with the first docstring line (or 'unavailable: <reason>')."""
    rows = []
    for name in sorted(REGISTRY):
        try:
            description = describe(resolve(name))
        except Exception as exc:  # any import-time failure makes this entry unavailable
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            description = f"unavailable: {reason}"
        rows.append((name, description))
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RewardSpec:
    """One reward function in a recipe: its name (or dotted path), weight, per-call timeout, and the
    keyword arguments `args` it is called with on top of the batch (e.g. a reward model's `path`)."""

    name: str
    weight: float = 1.0
    timeout_s: float = 10.0
    args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise UserError(f"reward name must be a non-empty string, got {self.name!r}")
        if not _is_number(self.weight) or not math.isfinite(self.weight):
            raise UserError(f"reward {self.name!r}: weight must be a finite number, got {self.weight!r}")
        if not _is_number(self.timeout_s) or not 0 < self.timeout_s < math.inf:
            raise UserError(
                f"reward {self.name!r}: timeout_s must be a positive number of seconds, "
                f"got {self.timeout_s!r}"
            )
        if not isinstance(self.args, dict) or not all(isinstance(k, str) for k in self.args):
            raise UserError(f"reward {self.name!r}: args must be a mapping of keyword names to values, "
                            f"got {self.args!r}")
        reserved = sorted(set(self.args) & {"prompts", "completions", "completion_ids"})
        if reserved:
            raise UserError(f"reward {self.name!r}: args may not set {reserved[0]!r}, which every call passes")


_SPEC_KEYS = ("name", "weight", "timeout_s", "args")


def _spec_from_entry(entry: Any) -> RewardSpec:
    if isinstance(entry, RewardSpec):
        return entry
    if isinstance(entry, str):
        return RewardSpec(name=entry)
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - set(_SPEC_KEYS), key=str)
        if unknown:
            raise UserError(f"unknown key {unknown[0]!r} (allowed: {', '.join(_SPEC_KEYS)})")
        if "name" not in entry:
            raise UserError("missing key 'name'")
        return RewardSpec(**entry)
    raise UserError(f"expected a reward name or a mapping with keys {', '.join(_SPEC_KEYS)}")


def parse_reward_specs(value: Any) -> list[RewardSpec]:
    """Turn a recipe's ``rewards`` value into RewardSpecs.

    Accepts a list whose entries are names/dotted paths or mappings ``{name, weight, timeout_s, args}``
    (a single name is accepted too). Raises UserError naming the bad entry, e.g.
    ``rewards[1] ({'name': 'x', 'weight': 'high'}): reward 'x': weight must be a finite number``.
    """
    entries = [value] if isinstance(value, (str, dict, RewardSpec)) else value
    if not isinstance(entries, (list, tuple)) or not entries:
        raise UserError(f"rewards must be a non-empty list of names or mappings, got {value!r}")
    specs: list[RewardSpec] = []
    for index, entry in enumerate(entries):
        try:
            spec = _spec_from_entry(entry)
        except UserError as exc:
            raise UserError(f"rewards[{index}] ({entry!r}): {exc}") from exc
        if any(spec.name == other.name for other in specs):
            raise UserError(f"rewards[{index}] ({entry!r}): reward {spec.name!r} is listed twice")
        specs.append(spec)
    return specs
