"""The built-in addition task as a benchmark (`addition`), and finding a quickstart run's task settings.

Rows are `AdditionTask(...).held_out(count, seed)`: the same held-out problems, in the same order,
that the quickstart evaluates, when the task options, `seed` and `count` (= `held_out_prompts`)
equal the run's. `--limit L` then takes the first L of them. (Taking `held_out(L, seed)` instead
would give different problems: `random.sample` picks by a different method for small counts.)

A run on the built-in task holds `recipe.json` (`rlpost.recipe.flat_settings`) with the keys
`data.task.*`, `seed`, `eval` and each stage's keys. Policies live at `RUN/<stage>/policy`,
`RUN/initial/policy` and `RUN/<stage>/checkpoints/step-N/policy`; `find_run_config` walks up from
the policy to find it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlpost.errors import UserError
from rlpost.evaluation.benchmarks import Benchmark, register_benchmark

ADDITION_VERIFIER = "addition"
DEFAULT_COUNT = 1000  # the quickstart's default held_out_prompts
DEFAULT_MAX_TOKENS = 8  # longest answer of two operands below 10**6 is 7 digits, plus EOS
_RUN_LEVELS = 4  # RUN/<stage>/checkpoints/step-N/policy is four levels below RUN


def load_addition(
    max_operand: int = 99,
    held_out_percent: int = 12,
    reverse: bool = True,
    carry_slip: float = 0.0,
    count: int = DEFAULT_COUNT,
    seed: int = 0,
    digits: int | None = None,
    carries: float = 1.0,
    kind: str = "addition",
    numbers: int = 6,
) -> Benchmark:
    """`count` held-out addition problems; reference = the exact answer, verifier "addition".
    With `digits`, the long-answer task (`LongAdditionTask`; max_operand unused); with `kind`
    'counting', the counting task (`rlpost.tasks.counting`: `digits` per number, `numbers` numbers)."""
    from rlpost.tasks import build_task

    try:
        task = build_task(kind, max_operand, held_out_percent, reverse, carry_slip, digits, carries, numbers)
        problems = task.held_out(count, seed)
    except ValueError as err:
        size = f"digits={digits}, carries={carries}" if digits is not None else f"max_operand={max_operand}"
        size = f"kind={kind}, digits={digits}, numbers={numbers}" if kind == "counting" else size
        raise UserError(
            f"addition benchmark: {err} ({size}, "
            f"held_out_percent={held_out_percent}); lower held_out_prompts/count"
        ) from err
    rows = [
        {"prompt": p.prompt, "reference": p.answer, "verifier": ADDITION_VERIFIER,
         "answer": p.answer, **p.columns()}
        for p in problems
    ]
    return Benchmark("addition", rows)


def find_run_config(model_dir: str | Path) -> Path | None:
    """`recipe.json` of the run that `model_dir` lies in (RUN/<stage>/policy, RUN/initial/policy or
    RUN/<stage>/checkpoints/step-N/policy), or None when it lies in no run or the run has no task."""
    here = Path(model_dir).resolve()
    for parent in list(here.parents)[:_RUN_LEVELS]:
        candidate = parent / "recipe.json"
        if candidate.is_file() and _is_run_config(candidate):
            return candidate
    return None


def _is_run_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("data.source") == "task"


def task_options(config_path: str | Path) -> tuple[dict[str, Any], int | None]:
    """Loader options for `load_addition` from a run's recipe.json, and its RL completion budget.

    The held-out count is the `limit` of the recipe's `held_out` evaluation (1000 without one).
    Raises UserError naming the file and key when a key is missing or the JSON is bad.
    """
    path = Path(config_path)
    if not path.is_file():
        raise UserError(f"run settings {path} do not exist; pass a run's recipe.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"run settings {path} are not valid JSON ({err.msg})") from err
    if not isinstance(data, dict) or data.get("data.source") != "task":
        raise UserError(f"{path} is not a run on the built-in task (data.source is not 'task')")
    options = {}
    for key in ("max_operand", "held_out_percent", "reverse", "carry_slip", "seed"):
        full = key if key == "seed" else f"data.task.{key}"
        if full not in data:
            raise UserError(f"run settings {path} lack key '{full}'")
        options[key] = data[full]
    if data.get("data.task.digits") is not None:  # the long-answer task; runs before it lack both keys
        options["digits"] = data["data.task.digits"]
        options["carries"] = data.get("data.task.carries", 1.0)
    if data.get("data.task.kind", "addition") != "addition":  # runs before the counting task lack these keys
        options["kind"] = data["data.task.kind"]
        options["numbers"] = data.get("data.task.numbers", 6)
    held = [e for e in data.get("eval", []) if isinstance(e, dict) and e.get("benchmark") == "held_out"]
    options["count"] = (held[0].get("limit") if held else None) or DEFAULT_COUNT
    budgets = [v for k, v in data.items() if k.endswith(".max_completion_length")]
    return options, (budgets[0] if budgets else None)


def run_prompt_format(config_path: str | Path):
    """The `PromptFormat` a run's recipe.json gave its prompts (data.prompt), or None where it is the
    default (the task's prompt as it is): held-out prompts must reach the policy as they did in training."""
    from rlpost.prompting import PromptFormat

    data = json.loads(Path(config_path).read_text(encoding="utf-8"))
    fmt = PromptFormat(template=data.get("data.prompt.template", "{prompt}"),
                       chat_template=data.get("data.prompt.chat_template"),
                       system_prompt=data.get("data.prompt.system_prompt"))
    return None if fmt == PromptFormat() else fmt


register_benchmark("addition", load_addition, overwrite=True)
