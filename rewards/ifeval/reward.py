"""IFEval reward functions in TRL's convention (dataset columns ``instruction_id_list``, ``kwargs``).

Reward of a sample with instructions ``i_1..i_n``:

    r = (1/n) * sum_j  1[response follows i_j]

the fraction of its instructions followed, strict or loose. Tulu 3's RLVR scores the
instruction check per prompt; most IFEval-style training prompts carry one instruction, where
this fraction is exactly that 0/1 reward, and with several it gives partial credit instead of
all-or-nothing. A sample without instructions (column missing, or an empty/None entry) gets
``None`` ("not applicable"), so the reward can be mixed with others in one dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rewards.errors import UserError
from rewards.ifeval.verifier import IFEvalResult, check_response


def _text(item: Any) -> str:
    """Plain text of a prompt or completion: a string, or the last message of a chat."""
    if isinstance(item, str):
        return item
    if isinstance(item, Sequence) and item and isinstance(item[-1], dict):
        return str(item[-1].get("content", ""))
    raise UserError(
        f"IFEval reward expects a string or a list of chat messages, got {type(item).__name__}"
    )


def _results(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    instruction_id_list: Sequence[Sequence[str] | None] | None,
    kwargs: Sequence[Sequence[dict | None] | None] | None,
) -> list[IFEvalResult | None]:
    """One IFEvalResult per sample, None where the sample has no instructions."""
    n = len(completions)
    ids = instruction_id_list if instruction_id_list is not None else [None] * n
    kws = kwargs if kwargs is not None else [None] * n
    if len(ids) != n or len(kws) != n:
        raise UserError(
            f"IFEval reward got {n} completions but {len(ids)} instruction_id_list and "
            f"{len(kws)} kwargs entries; pass one of each per completion"
        )
    results: list[IFEvalResult | None] = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if not ids[i]:
            results.append(None)
            continue
        row_kwargs = kws[i] if kws[i] is not None else [None] * len(ids[i])
        results.append(check_response(ids[i], row_kwargs, _text(completion), _text(prompt)))
    return results


def _fraction(flags: list[bool]) -> float:
    """Share of True entries."""
    return sum(flags) / len(flags)


def ifeval_strict_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Any = None,
    instruction_id_list: Sequence[Sequence[str] | None] | None = None,
    kwargs: Sequence[Sequence[dict | None] | None] | None = None,
    **_: Any,
) -> list[float | None]:
    """Fraction of the sample's IFEval instructions followed, strict check (None: no instructions)."""
    results = _results(prompts, completions, instruction_id_list, kwargs)
    return [None if r is None else _fraction(r.strict) for r in results]


def ifeval_loose_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Any = None,
    instruction_id_list: Sequence[Sequence[str] | None] | None = None,
    kwargs: Sequence[Sequence[dict | None] | None] | None = None,
    **_: Any,
) -> list[float | None]:
    """Fraction of the sample's IFEval instructions followed, loose check (None: no instructions)."""
    results = _results(prompts, completions, instruction_id_list, kwargs)
    return [None if r is None else _fraction(r.loose) for r in results]
