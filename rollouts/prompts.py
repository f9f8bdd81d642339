"""Prompt sources: an indexable, resumable stream of prompts with the dataset columns rewards need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class PromptSource(Protocol):
    """`get(i)` returns the i-th prompt of the stream and its columns; the same i always gives the same prompt."""

    def get(self, index: int) -> tuple[str, dict[str, Any]]: ...


@dataclass(frozen=True)
class TaskPrompts:
    """Training prompts of a built-in task (`rlpost.tasks`), with the `answer` column its checker needs."""

    task: Any
    seed: int = 0

    def get(self, index: int) -> tuple[str, dict[str, Any]]:
        problem = self.task.train_problem(self.seed, index)
        return problem.prompt, {"answer": problem.answer}
