"""The addition task's checker: a completion scores 1 when it is exactly the answer.

    score(completion, answer) = 1  if strip(completion) == strip(answer)  else 0

It is the one checker of that task: the RL reward `exact_match_reward` and the held-out
evaluation both call `score_answer`.
"""

from __future__ import annotations


def score_answer(completion: str, answer: str) -> float:
    """1.0 if the completion, stripped of whitespace, is exactly the answer; else 0.0."""
    return 1.0 if completion.strip() == answer.strip() else 0.0


def exact_match_reward(prompts, completions, completion_ids=None, answer=None, **kwargs) -> list[float | None]:
    """Addition task: 1 if the completion is exactly the sum, else 0 (needs an `answer` column)."""
    if answer is None:
        return [None] * len(completions)
    return [score_answer(c, a) for c, a in zip(completions, answer, strict=True)]
