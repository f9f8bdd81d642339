"""Checking one response against an IFEval prompt's instructions, strict and loose.

Strict: the checker runs on the response as given; a blank response follows no instruction
(as in the reference, so an empty answer cannot pass "no commas" or "fewer than N words").
Loose (IFEval paper, section 3): the checker runs on 8 variants of the response -- the
response, it without its first line, without its last line, without both; each of those also
with every ``*`` removed (markdown emphasis) -- and the instruction passes if it passes on any
non-blank variant. So strict => loose.

Prompt-level: ``prompt_strict`` is True when every instruction passes strictly (likewise loose).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rewards.errors import UserError
from rewards.ifeval.checkers import CHECKERS, RELATIONS

SUPPORTED_IDS = frozenset(CHECKERS)


@dataclass(frozen=True)
class IFEvalResult:
    """Per-instruction outcomes for one response, and the prompt-level ones (all passed)."""

    strict: list[bool]
    loose: list[bool]
    prompt_strict: bool
    prompt_loose: bool

    @classmethod
    def from_lists(cls, strict: list[bool], loose: list[bool]) -> "IFEvalResult":
        """Result whose prompt-level outcomes are ``all(strict)`` and ``all(loose)``."""
        return cls(strict=strict, loose=loose, prompt_strict=all(strict), prompt_loose=all(loose))


def _convert(instruction_id: str, name: str, kind: str, value: Any) -> Any:
    """One kwarg checked and converted to the type its checker takes."""
    where = f"IFEval kwarg {name!r} of {instruction_id!r}"
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise UserError(f"{where} must be an integer, got {value!r}; fix the dataset row")
        return int(value)
    if kind == "str_list":
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where} must be a list of strings, got {value!r}; fix the dataset row")
        return list(value)
    if not isinstance(value, str):
        raise UserError(f"{where} must be a string, got {value!r}; fix the dataset row")
    if kind == "relation" and value not in RELATIONS:
        raise UserError(f"{where} must be one of {RELATIONS}, got {value!r}; fix the dataset row")
    if kind == "letter":
        letter = value.strip()
        if len(letter) != 1:
            raise UserError(f"{where} must be one character, got {value!r}; fix the dataset row")
        return letter
    return value


def normalize_kwargs(instruction_id: str, kwargs: Mapping[str, Any] | None, prompt: str) -> dict:
    """The instruction's kwargs with ``None`` values dropped, validated and typed.

    Raises UserError for an unknown instruction id, a missing or unexpected kwarg, or a
    value of the wrong type. ``combination:repeat_prompt`` without ``prompt_to_repeat``
    repeats ``prompt``.
    """
    spec = CHECKERS.get(instruction_id)
    if spec is None:
        raise UserError(
            f"unknown IFEval instruction id {instruction_id!r}; supported: {sorted(SUPPORTED_IDS)}"
        )
    given = {k: v for k, v in (kwargs or {}).items() if v is not None}
    if instruction_id == "combination:repeat_prompt":
        given.setdefault("prompt_to_repeat", prompt)
    unexpected = sorted(set(given) - set(spec.params))
    missing = sorted(set(spec.params) - set(given))
    if unexpected or missing:
        raise UserError(
            f"IFEval instruction {instruction_id!r} takes kwargs {sorted(spec.params)}; "
            f"missing {missing}, unexpected {unexpected}; fix the dataset row"
        )
    return {k: _convert(instruction_id, k, spec.params[k], v) for k, v in given.items()}


def check_instruction(
    instruction_id: str, kwargs: Mapping[str, Any] | None, response: str, prompt: str = ""
) -> bool:
    """True when ``response`` follows the instruction (strict check)."""
    typed = normalize_kwargs(instruction_id, kwargs, prompt)
    return _check_strict(instruction_id, typed, response)


def _check_strict(instruction_id: str, typed: dict, response: str) -> bool:
    """True when ``response`` is not blank and passes the checker."""
    return bool(response.strip()) and CHECKERS[instruction_id].check(response, **typed)


def loose_variants(response: str) -> list[str]:
    """The 8 response variants of the IFEval loose check (some may coincide)."""
    lines = response.split("\n")
    cut = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return cut + [v.replace("*", "") for v in cut]


def _check_loose(instruction_id: str, typed: dict, response: str) -> bool:
    """True when any non-blank loose variant passes."""
    check = CHECKERS[instruction_id].check
    return any(v.strip() and check(v, **typed) for v in loose_variants(response))


def check_response(
    instruction_id_list: Sequence[str],
    kwargs_list: Sequence[Mapping[str, Any] | None],
    response: str,
    prompt: str = "",
) -> IFEvalResult:
    """Strict and loose outcome of every instruction of one prompt for ``response``."""
    if len(instruction_id_list) != len(kwargs_list):
        raise UserError(
            f"IFEval row has {len(instruction_id_list)} instruction ids but "
            f"{len(kwargs_list)} kwargs entries; they must pair up one to one"
        )
    strict, loose = [], []
    for instruction_id, kwargs in zip(instruction_id_list, kwargs_list):
        typed = normalize_kwargs(instruction_id, kwargs, prompt)
        passed = _check_strict(instruction_id, typed, response)
        strict.append(passed)
        loose.append(passed or _check_loose(instruction_id, typed, response))
    return IFEvalResult.from_lists(strict, loose)
