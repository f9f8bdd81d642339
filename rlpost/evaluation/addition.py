"""The built-in addition task as a benchmark (`addition`), and finding a quickstart run's task settings.

Rows are `AdditionTask(...).held_out(count, seed)`: the same held-out problems, in the same order,
that the quickstart evaluates, when the task options, `seed` and `count` (= `held_out_prompts`)
equal the run's. `--limit L` then takes the first L of them. (Taking `held_out(L, seed)` instead
would give different problems: `random.sample` picks by a different method for small counts.)

A quickstart run directory holds `config.json` with the keys `task.max_operand`,
`task.held_out_percent`, `task.reverse`, `task.carry_slip`, `seed`, `held_out_prompts` and
`rl.max_tokens`. Policies live at `RUN/policy`, `RUN/sft/policy` and
`RUN/checkpoints/step-N/policy`; `find_run_config` walks up from the policy to find it.
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
_RUN_LEVELS = 3  # RUN/checkpoints/step-N/policy is three levels below RUN


def load_addition(
    max_operand: int = 99,
    held_out_percent: int = 15,
    reverse: bool = False,
    carry_slip: float = 0.0,
    count: int = DEFAULT_COUNT,
    seed: int = 0,
) -> Benchmark:
    """`count` held-out addition problems; reference = the exact answer, verifier "addition"."""
    from rlpost.tasks.arithmetic import AdditionTask

    task = AdditionTask(max_operand, held_out_percent, reverse, carry_slip)
    try:
        problems = task.held_out(count, seed)
    except ValueError as err:
        raise UserError(
            f"addition benchmark: {err} (max_operand={max_operand}, "
            f"held_out_percent={held_out_percent}); lower held_out_prompts/count"
        ) from err
    rows = [
        {"prompt": p.prompt, "reference": p.answer, "verifier": ADDITION_VERIFIER,
         "answer": p.answer, "a": p.a, "b": p.b}
        for p in problems
    ]
    return Benchmark("addition", rows)


def find_run_config(model_dir: str | Path) -> Path | None:
    """`config.json` of the quickstart run that `model_dir` lies in, or None.

    Looks in the 1..3 directories above `model_dir` (not in `model_dir` itself, whose
    config.json is the model's) for a config.json that has a `task` section.
    """
    here = Path(model_dir).resolve()
    for parent in list(here.parents)[:_RUN_LEVELS]:
        candidate = parent / "config.json"
        if candidate.is_file() and _is_run_config(candidate):
            return candidate
    return None


def _is_run_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("task"), dict)


def task_options(config_path: str | Path) -> tuple[dict[str, Any], int | None]:
    """Loader options for `load_addition` from a run's config.json, and its `rl.max_tokens`.

    Raises UserError naming the file and key when a key is missing or the JSON is bad.
    """
    path = Path(config_path)
    if not path.is_file():
        raise UserError(f"task config {path} does not exist; pass a run's config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"task config {path} is not valid JSON ({err.msg})") from err
    task = data.get("task") if isinstance(data, dict) else None
    if not isinstance(task, dict):
        raise UserError(f"task config {path} has no 'task' section; pass a quickstart run's config.json")
    options = {}
    for key in ("max_operand", "held_out_percent", "reverse", "carry_slip"):
        if key not in task:
            raise UserError(f"task config {path} lacks key 'task.{key}'")
        options[key] = task[key]
    for key, option in (("seed", "seed"), ("held_out_prompts", "count")):
        if key not in data:
            raise UserError(f"task config {path} lacks key '{key}'")
        options[option] = data[key]
    rl = data.get("rl")
    max_tokens = rl.get("max_tokens") if isinstance(rl, dict) else None
    return options, max_tokens


register_benchmark("addition", load_addition, overwrite=True)
