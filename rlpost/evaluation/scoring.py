"""Scoring benchmark samples with the row's verifier: the same checkers the training rewards use.

Verifiers (a row's `verifier` column):
  math       `rewards.math_verifier.score_math(completion, gold)`; gold = the row's `answer`
             (else `reference`). Vote answer for maj@k: `extract_answer(completion).answer`.
  addition   `rlpost.tasks.arithmetic.score_answer(completion, answer)`; vote answer: the
             completion stripped of whitespace (exactly what the checker compares).
  humaneval  `rewards.code_verifier.code_tests_reward` (sandboxed; 1.0 when HumanEval's
             `check(entry_point)` passes); columns `test`, `entry_point`. No vote answer.
  ifeval     `rewards.ifeval.check_response`; the sample score is prompt-level strict (1.0 when
             every instruction passes the strict check); per-instruction strict and loose
             outcomes are kept for the IFEval figures. No vote answer.
  any other  a reward function by registered name or dotted path (`rewards.registry.resolve`),
             called in TRL's convention with the row's other columns. No vote answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rlpost.errors import UserError

_NOT_COLUMNS = ("prompt", "reference", "verifier")
VOTING_VERIFIERS = frozenset({"math", "addition"})  # verifiers whose scores carry a vote answer


@dataclass(frozen=True)
class SampleScore:
    """Score of one sample; `answer` is its vote for maj@k (None: no answer or not votable);
    `strict`/`loose` are IFEval's per-instruction outcomes (None for other verifiers)."""

    score: float
    answer: str | None = None
    strict: tuple[bool, ...] | None = None
    loose: tuple[bool, ...] | None = None


@dataclass(frozen=True)
class Item:
    """One sample to score: its row index, the row, and the completion text."""

    row_index: int
    row: dict[str, Any]
    text: str


def _gold(item: Item, column: str = "answer") -> str:
    gold = item.row.get(column)
    if gold is None or not str(gold).strip():
        gold = item.row.get("reference")
    if gold is None or not str(gold).strip():
        raise UserError(f"row {item.row_index} has no {column!r} or 'reference' to score against; "
                        f"add the column (or --column {column}=NAME)")
    return str(gold)


def _score_math(items: Sequence[Item]) -> list[SampleScore]:
    from rewards.math_verifier import extract_answer, score_math

    return [SampleScore(score_math(it.text, _gold(it)), extract_answer(it.text).answer) for it in items]


def _score_addition(items: Sequence[Item]) -> list[SampleScore]:
    from rlpost.tasks.arithmetic import score_answer

    return [SampleScore(score_answer(it.text, _gold(it)), it.text.strip()) for it in items]


def _require(items: Sequence[Item], columns: Sequence[str], verifier: str) -> None:
    for it in items:
        for column in columns:
            if it.row.get(column) in (None, "", []):
                raise UserError(f"row {it.row_index} lacks column {column!r}, which the "
                                f"{verifier!r} verifier needs; add it or map it with --column")


def _score_humaneval(items: Sequence[Item]) -> list[SampleScore]:
    from rewards.code_verifier import code_tests_reward

    _require(items, ("test", "entry_point"), "humaneval")
    scores = code_tests_reward(
        [it.row["prompt"] for it in items], [it.text for it in items],
        test=[it.row["test"] for it in items], entry_point=[it.row["entry_point"] for it in items],
    )
    return [SampleScore(float(s)) for s in scores]


def _score_ifeval(items: Sequence[Item]) -> list[SampleScore]:
    from rewards.ifeval import check_response

    _require(items, ("instruction_id_list",), "ifeval")
    out = []
    for it in items:
        ids = it.row["instruction_id_list"]
        kwargs = it.row.get("kwargs") or [None] * len(ids)
        result = check_response(ids, kwargs, it.text, it.row["prompt"])
        out.append(SampleScore(float(result.prompt_strict), None, tuple(result.strict), tuple(result.loose)))
    return out


def _score_reward(name: str) -> Callable[[Sequence[Item]], list[SampleScore]]:
    """A scorer that calls the reward function `name` once on all items (TRL convention)."""
    from rewards.registry import resolve

    func = resolve(name)

    def score(items: Sequence[Item]) -> list[SampleScore]:
        columns = sorted({k for it in items for k in it.row if k not in _NOT_COLUMNS})
        values = {c: [it.row.get(c) for it in items] for c in columns}
        rewards = func(prompts=[it.row["prompt"] for it in items], completions=[it.text for it in items],
                       completion_ids=None, **values)
        out = []
        for it, reward in zip(items, rewards, strict=True):
            if reward is None:
                raise UserError(f"verifier {name!r} returned None (not applicable) for row "
                                f"{it.row_index}; give that row the columns {name!r} needs")
            out.append(SampleScore(float(reward)))
        return out

    return score


SCORERS: dict[str, Callable[[Sequence[Item]], list[SampleScore]]] = {
    "math": _score_math,
    "addition": _score_addition,
    "humaneval": _score_humaneval,
    "ifeval": _score_ifeval,
}


def scorer(verifier: str) -> Callable[[Sequence[Item]], list[SampleScore]]:
    """The batch scorer for a verifier name (built-in, registered reward, or dotted path)."""
    if verifier in SCORERS:
        return SCORERS[verifier]
    try:
        return _score_reward(verifier)
    except UserError as err:
        raise UserError(f"unknown verifier {verifier!r}: use one of {', '.join(SCORERS)}, "
                        f"a reward name from `rlpost rewards list`, or a dotted path ({err})") from err


def score_samples(rows: Sequence[dict[str, Any]], completions: Sequence[Sequence[str]]) -> list[list[SampleScore]]:
    """Scores of every completion (`completions[i][j]`: sample j of row i), grouped by verifier."""
    if len(rows) != len(completions):
        raise ValueError(f"{len(rows)} rows but {len(completions)} completion lists")
    by_verifier: dict[str, list[tuple[int, int]]] = {}
    for i, (row, texts) in enumerate(zip(rows, completions)):
        for j in range(len(texts)):
            by_verifier.setdefault(str(row.get("verifier")), []).append((i, j))
    out: list[list[SampleScore | None]] = [[None] * len(texts) for texts in completions]
    for verifier, slots in by_verifier.items():
        items = [Item(i, rows[i], completions[i][j]) for i, j in slots]
        for (i, j), result in zip(slots, scorer(verifier)(items), strict=True):
            out[i][j] = result
    return out  # type: ignore[return-value]
