"""Math final-answer checking: extract the answer from a completion, compare it with math-verify.

One checker (`score_math`) serves both the training reward (`math_accuracy_reward`) and the
benchmark scorer, so a sample's reward and its benchmark score can never disagree.

Extraction order (`extract_answer`): the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces),
then the number after the last GSM8K ``####`` marker, then the last number in the text (a
plain or decimal number, thousands commas allowed, or a simple fraction ``3/4``).

Equivalence (`answers_equivalent`) is math-verify's: both strings are parsed to SymPy (LaTeX and
plain expressions) and compared numerically / symbolically. What math-verify decides for the
cases users ask about (checked in tests/test_math_verifier.py):
- fractions, decimals, radicals, intervals, tuples, sets, negatives: compared as maths;
- a gold percentage ``50\\%`` accepts both ``50`` and ``0.5``;
- units are dropped: ``5 cm`` equals ``5``;
- ``x = 2`` as a prediction equals a gold ``2`` (the right-hand side counts);
- a bare comma list is a set: ``2, 3`` equals ``3, 2``.
Known gaps (math-verify 0.9.0, strict-xfail tests): ``\\varnothing`` != ``\\emptyset``,
``1e3`` != ``1000``, plain ``pi`` != ``\\pi``, ``1 \\le x \\le 2`` != gold ``[1,2]``.
Plain words (``yes``, ``Monday``) would parse as products of symbols (``yes`` == ``sey``), so
when both answers are pure text (two letters or more) they are compared as case-insensitive
strings instead.

math-verify enforces its timeouts with ``signal.alarm``, which works only on a process's main
thread. On other threads we pass ``parsing_timeout=None`` / ``timeout_seconds=None`` (no signal);
callers that run rewards off the main thread bound the time themselves (rewards/pool.py).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Literal

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rewards.errors import UserError

TIMEOUT_SECONDS = 5
_EXTRACTION_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_GSM8K_RE = re.compile(rf"####[ \t]*(?:\\?\$)?[ \t]*({_NUMBER})")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TEXT_RE = re.compile(r"[A-Za-z][A-Za-z' -]*[A-Za-z]")
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}")


@dataclass(frozen=True)
class Extraction:
    """A final answer pulled out of a completion, and which rule found it."""

    answer: str | None
    method: Literal["boxed", "gsm8k", "last_number", "none"]


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` whose braces balance, else None."""
    for match in reversed(list(_BOX_RE.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def _clean(answer: str) -> str:
    """Strip spaces, ``$`` / ``\\$``, a trailing full stop, and thousands commas of a plain number."""
    answer = answer.strip().replace("\\$", "").replace("$", "").strip()
    answer = answer.rstrip(".").strip()
    if _THOUSANDS_RE.fullmatch(answer):
        answer = answer.replace(",", "")
    return answer


def extract_answer(text: str) -> Extraction:
    """Final answer of ``text``: last boxed, else last ``#### n`` line, else last number."""
    boxed = _last_boxed(text)
    if boxed is not None and _clean(boxed):
        return Extraction(_clean(boxed), "boxed")
    gsm8k = _GSM8K_RE.findall(text)
    if gsm8k and _clean(gsm8k[-1]):
        return Extraction(_clean(gsm8k[-1]), "gsm8k")
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return Extraction(_clean(numbers[-1]), "last_number")
    return Extraction(None, "none")


def gsm8k_gold(answer_field: str) -> str:
    """The final answer after ``####`` in a GSM8K solution, commas removed (``1,000`` -> ``1000``)."""
    found = _GSM8K_RE.findall(answer_field)
    if not found or not _clean(found[-1]):
        raise UserError(
            f"GSM8K answer has no '#### <number>' line: {answer_field[-80:]!r}; "
            "pass the full GSM8K solution or the bare final answer"
        )
    return _clean(found[-1])


def _timeout() -> int | None:
    """Signal-based timeout on the main thread; None (no signal use) on any other thread."""
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def _as_text(answer: str) -> str | None:
    """Lower-cased words if ``answer`` is plain text (``\\text{Yes}``, ``no solution``), else None."""
    stripped = _TEXT_CMD_RE.sub(r"\1", _clean(answer)).strip()
    if _TEXT_RE.fullmatch(stripped):
        return " ".join(stripped.lower().split())
    return None


def _parse(answer: str) -> list[Any]:
    """math-verify parse of one bare answer, wrapped in ``$...$`` so LaTeX and plain both parse."""
    return parse(
        f"${_clean(answer)}$",
        extraction_config=_EXTRACTION_CONFIG,
        parsing_timeout=_timeout(),
    )


def answers_equivalent(pred: str, gold: str) -> bool:
    """True if the predicted final answer equals the gold one (math-verify, gold first)."""
    pred_text, gold_text = _as_text(pred), _as_text(gold)
    if pred_text is not None and gold_text is not None:
        return pred_text == gold_text
    gold_parsed, pred_parsed = _parse(gold), _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=_timeout()))


def _gold_answer(gold: str) -> str:
    """A bare gold answer: the ``####`` number of a full GSM8K solution, else ``gold`` itself."""
    return gsm8k_gold(gold) if "####" in gold else gold


def score_math(completion: str, gold: str) -> float:
    """1.0 if the completion's extracted final answer is equivalent to ``gold``, else 0.0.

    ``gold`` is either a bare final answer (``\\frac{1}{2}``, ``18``) or a full GSM8K solution
    ending in ``#### n``. A completion with no extractable answer scores 0.0.
    """
    extracted = extract_answer(completion)
    if extracted.answer is None:
        return 0.0
    return 1.0 if answers_equivalent(extracted.answer, _gold_answer(gold)) else 0.0


def completion_text(completion: Any, index: int) -> str:
    """Text of one TRL completion: a string, or the last message's content of a chat list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
    raise UserError(
        f"completion {index} is {type(completion).__name__}, not a string or a chat list of "
        "{'role', 'content'} messages; pass text completions or conversational ones"
    )


def math_accuracy_reward(
    prompts: list[Any] | None,
    completions: list[Any],
    completion_ids: list[list[int]] | None = None,
    answer: list[str | None] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """Math final-answer accuracy: 1.0 if it matches the `answer` column (math-verify), else 0.0.

    ``answer`` holds each sample's gold final answer or full GSM8K solution (``#### n``).
    A sample whose gold answer is None or empty gets None (not applicable).
    """
    if answer is None:
        raise UserError(
            "math_accuracy_reward needs a dataset column 'answer' with the gold final answer; "
            "add it to the dataset or drop this reward"
        )
    if len(answer) != len(completions):
        raise UserError(
            f"math_accuracy_reward got {len(completions)} completions but {len(answer)} answers; "
            "pass one 'answer' per completion"
        )
    rewards: list[float | None] = []
    for i, (completion, gold) in enumerate(zip(completions, answer)):
        if gold is None or not str(gold).strip():
            rewards.append(None)
            continue
        rewards.append(score_math(completion_text(completion, i), str(gold)))
    return rewards
