"""What the stages train and validate on, from a recipe's `data` section: the built-in task or a dataset.

`TrainingData` answers the same questions for both kinds of source:
- `prompts()`: the resumable RL prompt stream (`rollouts.prompts.PromptSource`), with every
  non-prompt column passed to the reward functions;
- `demonstrations(n, column)`: SFT rows `{prompt, completion, ...}`;
- `validation(n, exclude)`: rows outside the demonstrations, for SFT early stopping, each with
  the `answer` its checker needs;
- `held_out(limit)`: the task's held-out prompts as a benchmark (`eval: [{benchmark: held_out}]`).
Prompt text is never formatted here: `format` (a `PromptFormat`) does that on every path.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlpost.errors import UserError
from rlpost.prompting import PromptFormat


@dataclass
class TrainingData:
    section: Any  # rlpost.recipe.DataSection
    seed: int
    base_dir: Path = Path(".")

    def __post_init__(self) -> None:
        self.format: PromptFormat = self.section.prompt
        self._rows: list[dict] | None = None

    @property
    def is_task(self) -> bool:
        return self.section.source == "task"

    def task(self):
        from rlpost.tasks import build_task

        t = self.section.task
        return build_task(t.kind, t.max_operand, t.held_out_percent, t.reverse, t.carry_slip, t.digits, t.carries,
                          t.numbers)

    def rows(self) -> list[dict]:
        """The dataset's rows (datasets only), read once."""
        from rlpost.data import read_rows

        if self._rows is None:
            self._rows = read_rows(self.section.source, split=self.section.split,
                                   columns=self.section.columns, base_dir=self.base_dir)
        return self._rows

    def pool_size(self) -> int:
        """How many distinct training prompts exist (the long task: an estimate, never enumerated)."""
        return self.task().pool_size if self.is_task else len(self.rows())

    def prompts(self):
        from rlpost.data import DatasetPrompts
        from rollouts.prompts import TaskPrompts

        if self.is_task:
            return TaskPrompts(self.task(), self.seed)
        return DatasetPrompts(tuple(self.rows()), self.seed)

    def demonstrations(self, count: int | None, column: str = "completion") -> list[dict]:
        """SFT rows; for the task, `count` demonstrations of its careless demonstrator."""
        if self.is_task:
            task = self.task()
            return [{"prompt": p, "completion": c, "answer": task.answer_for(p)}
                    for p, c in task.demonstrations(count, self.seed)]
        rows = self.rows()
        if column not in rows[0]:
            raise UserError(f"data {self.section.source}: SFT needs a completion column {column!r}; columns are "
                            f"{', '.join(rows[0])} (set the sft stage's completion_column or map one in data.columns)")
        order = list(range(len(rows)))
        random.Random(f"demos:{self.seed}").shuffle(order)
        chosen = order[:count] if count else order
        return [{**rows[i], "completion": str(rows[i][column])} for i in chosen]

    def validation(self, count: int, exclude: set[str]) -> list[dict]:
        """`count` rows whose prompts are not in `exclude` (the demonstrations), with their `answer`."""
        if self.is_task:
            task = self.task()
            found, seen = [], set(exclude)
            for i in range(100 * count):
                p = task.train_problem(self.seed + 10_000, i)
                if p.prompt not in seen:
                    seen.add(p.prompt)
                    found.append({"prompt": p.prompt, "answer": p.answer})
                if len(found) == count:
                    return found
            raise UserError(f"only {len(found)} training prompts lie outside the {len(exclude)} demonstrations; "
                            f"lower the sft stage's demonstrations or validation_prompts")
        rows = [r for r in self.rows() if r["prompt"] not in exclude]
        return rows[:count]

    def held_out(self, limit: int | None):
        """The task's held-out prompts as a `Benchmark` (verifier 'addition')."""
        from rlpost.evaluation.addition import load_addition

        t = self.section.task
        return load_addition(t.max_operand, t.held_out_percent, t.reverse, t.carry_slip,
                             count=limit or 1000, seed=self.seed, digits=t.digits, carries=t.carries,
                             kind=t.kind, numbers=t.numbers)
