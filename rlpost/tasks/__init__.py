"""Built-in synthetic verifiable tasks: a prompt generator plus one checker shared by reward and evaluation.

`kind` 'addition' (`rlpost.tasks.arithmetic`: the quickstart's, and long addition with `digits`) or
'counting' (`rlpost.tasks.counting`: long answers a 20M model learns in minutes; `digits` per number).
"""

from __future__ import annotations

TASK_KINDS = ("addition", "counting")


def build_task(kind: str = "addition", max_operand: int = 99, held_out_percent: int = 15, reverse: bool = False,
               carry_slip: float = 0.0, digits: int | None = None, carries: float = 1.0, numbers: int = 6):
    """The task that the recipe keys `data.task.*` describe (counting uses `digits`, `numbers`,
    `held_out_percent` and `carry_slip`; its numbers are always written least significant digit first)."""
    if kind == "addition":
        from rlpost.tasks.arithmetic import addition_task

        return addition_task(max_operand, held_out_percent, reverse, carry_slip, digits, carries)
    if kind == "counting":
        from rlpost.tasks.counting import CountingTask

        if digits is None:
            raise ValueError("the counting task needs digits (how many digits each number has)")
        return CountingTask(digits, numbers, held_out_percent, carry_slip)
    raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(TASK_KINDS)}")
