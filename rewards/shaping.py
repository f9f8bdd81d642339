"""Shaping rewards: output-format checks and DAPO's soft overlong penalty (TRL reward convention)."""

from __future__ import annotations

import re
from typing import Any, Callable

from rewards.errors import UserError
from rewards.math_verifier import completion_text

RewardFn = Callable[..., list[float | None]]
DEFAULT_TAGS = ("think", "answer")
_TAG_NAME_RE = re.compile(r"[A-Za-z][\w-]*")


def _compile(pattern: str) -> re.Pattern[str]:
    """Compile a user's format regex, turning a bad one into a UserError."""
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as err:
        message = f"format pattern {pattern!r} is not a valid regex ({err}); fix the pattern"
        raise UserError(message) from err


def _check_tags(tags: list[str]) -> list[str]:
    """Validate tag names (``think``, ``answer``; no angle brackets)."""
    if not tags:
        raise UserError("required_tags is empty; name at least one tag, e.g. ['think', 'answer']")
    for tag in tags:
        if not isinstance(tag, str) or not _TAG_NAME_RE.fullmatch(tag):
            raise UserError(f"required tag {tag!r} is not a tag name; write e.g. 'think', without '<>'")
    return list(tags)


def tags_in_order(text: str, tags: list[str]) -> bool:
    """True if each ``<tag>...</tag>`` appears exactly once, in the given order, without overlap.

    Only whitespace may come after the last closing tag, so an answer cannot be followed by
    more reasoning. Text before the first opening tag is allowed.
    """
    position = 0
    for tag in tags:
        opening, closing = f"<{tag}>", f"</{tag}>"
        if text.count(opening) != 1 or text.count(closing) != 1:
            return False
        start = text.find(opening)
        end = text.find(closing)
        if start < position or end < start + len(opening):
            return False
        position = end + len(closing)
    return not text[position:].strip()


def make_format_reward(pattern: str | None = None, required_tags: list[str] | None = None) -> RewardFn:
    """A TRL reward: 1.0 if a completion has the required format, else 0.0.

    ``pattern``: a regex the whole completion (stripped) must match (``re.DOTALL``).
    ``required_tags``: tag names that must each appear once as ``<tag>...</tag>``, in order,
    with nothing but whitespace after the last. With neither given, the tags are
    ``think``, ``answer``. With both given, both checks must pass.
    """
    regex = _compile(pattern) if pattern is not None else None
    if required_tags is None and pattern is None:
        required_tags = list(DEFAULT_TAGS)
    tags = _check_tags(required_tags) if required_tags is not None else None

    def format_reward(
        prompts: list[Any] | None,
        completions: list[Any],
        completion_ids: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        rewards: list[float | None] = []
        for i, completion in enumerate(completions):
            text = completion_text(completion, i)
            ok = regex is None or regex.fullmatch(text.strip()) is not None
            ok = ok and (tags is None or tags_in_order(text, tags))
            rewards.append(1.0 if ok else 0.0)
        return rewards

    layout = f"pattern {pattern!r}" if regex is not None else ""
    if tags is not None:
        layout += (" and " if layout else "") + "".join(f"<{t}>...</{t}>" for t in tags)
    format_reward.__doc__ = f"Format check: 1.0 if the completion matches {layout}, else 0.0."
    return format_reward


def _overlong_value(length: int, max_length: int, cache: int) -> float:
    """Soft overlong penalty of one completion of ``length`` tokens (maths in make_overlong_penalty)."""
    if length <= max_length - cache:
        return 0.0
    if length <= max_length:
        return (max_length - cache - length) / cache
    return -1.0


def make_overlong_penalty(max_length: int, cache: int) -> RewardFn:
    """A TRL reward: DAPO's soft overlong punishment from completion lengths in tokens.

    With L = len(completion_ids[i]), L_max = ``max_length`` and L_cache = ``cache``::

        R(L) = 0                                  if L <= L_max - L_cache
        R(L) = ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max
        R(L) = -1                                 if L > L_max

    R falls linearly from 0 to -1 over the last L_cache tokens below L_max, so it is
    continuous: R(L_max - L_cache) = 0 and R(L_max) = -1. Requires 1 <= cache <= max_length.
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise UserError(f"overlong penalty max_length={max_length!r}; set a positive integer")
    if not isinstance(cache, int) or not 1 <= cache <= max_length:
        raise UserError(f"overlong penalty cache={cache!r}; set an integer in 1..{max_length}")

    def overlong_penalty(
        prompts: list[Any] | None,
        completions: list[Any],
        completion_ids: list[list[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        if completion_ids is None:
            raise UserError(
                "overlong penalty needs completion_ids (token ids of each completion); "
                "call it through TRL or pass completion_ids"
            )
        return [_overlong_value(len(ids), max_length, cache) for ids in completion_ids]

    overlong_penalty.__doc__ = (
        f"DAPO soft overlong penalty: 0 up to {max_length - cache} tokens, "
        f"linear to -1 at {max_length}, -1 beyond."
    )
    return overlong_penalty


format_tags_reward = make_format_reward()
format_tags_reward.__name__ = "format_tags_reward"
overlong_penalty_reward = make_overlong_penalty(max_length=512, cache=128)
overlong_penalty_reward.__name__ = "overlong_penalty_reward"


def format_regex_reward(prompts, completions, completion_ids=None, pattern: str | None = None,
                        **kwargs: Any) -> list[float | None]:
    """1.0 if a completion contains a match of `pattern` (a recipe arg, `re.DOTALL`), else 0.0."""
    if not pattern:
        raise UserError("reward 'format_regex' needs args: {pattern: REGEX} in the recipe")
    regex = _compile(pattern)
    return [1.0 if regex.search(completion_text(c, i)) else 0.0 for i, c in enumerate(completions)]
