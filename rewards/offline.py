"""Offline scoring of a JSONL file with one reward function (``rlpost score``).

Each input line is a JSON object with ``completion`` (a string, or a list of chat messages),
optionally ``prompt`` and ``completion_ids``, plus any dataset columns the reward function
reads (e.g. ``answer``). Every row is written back unchanged with an added ``reward`` field:
a float, or ``null`` when the function found the row not applicable or failed on it (an
existing ``reward`` field is replaced). Scoring runs in the isolated reward pool, so a
function that hangs or crashes costs only its own rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rewards.errors import UserError
from rewards.pool import RESERVED_ARGS, RewardPool
from rewards.registry import RewardSpec

ROW_KEYS = ("prompt", "completion", "completion_ids")
OUTPUT_KEY = "reward"


def _parse_line(line: str, lineno: int, path: Path) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {lineno} is not valid JSON ({exc.msg}); "
                        "write one JSON object per line") from exc
    if not isinstance(row, dict):
        raise UserError(f"{path}: line {lineno} is a JSON {type(row).__name__}, "
                        "not an object with a 'completion' key")
    if "completion" not in row:
        raise UserError(f"{path}: line {lineno} has no 'completion' key; "
                        "add the text to score under 'completion'")
    if not isinstance(row["completion"], (str, list)):
        raise UserError(f"{path}: line {lineno}: 'completion' must be a string "
                        "or a list of chat messages")
    clash = sorted(set(row) & set(RESERVED_ARGS))
    if clash:
        raise UserError(f"{path}: line {lineno}: key {clash[0]!r} clashes with a "
                        "reward-function argument; rename it")
    return row


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read and validate every row (blank lines are skipped); UserError names the 1-based line."""
    if not path.is_file():
        raise UserError(f"input file {path} does not exist; give a JSONL file with --input")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                rows.append(_parse_line(line, lineno, path))
    if not rows:
        raise UserError(f"input file {path} has no rows; write one JSON object per line")
    return rows


def column_names(rows: list[dict[str, Any]]) -> list[str]:
    """Dataset columns: every key of any row except prompt, completion, completion_ids, reward."""
    return sorted({key for row in rows for key in row} - set(ROW_KEYS) - {OUTPUT_KEY})


def _batch_arguments(rows: list[dict[str, Any]],
                     names: list[str]) -> tuple[list, list, list | None, dict]:
    """Prompts ('' when absent), completions, completion ids (None when no row has them) and
    dataset columns (None for a row without that column)."""
    prompts = [row.get("prompt", "") for row in rows]
    completions = [row["completion"] for row in rows]
    has_ids = any("completion_ids" in row for row in rows)
    completion_ids = [row.get("completion_ids") for row in rows] if has_ids else None
    columns = {name: [row.get(name) for row in rows] for name in names}
    return prompts, completions, completion_ids, columns


def score_file(reward: str, input_path: str | Path, output_path: str | Path, workers: int = 2,
               timeout_s: float = 10.0, batch_size: int = 256) -> dict[str, Any]:
    """Score every row of ``input_path`` with ``reward`` and write ``output_path``.

    Returns a summary: ``count`` rows, ``scored`` rows with a numeric reward, ``mean`` of those
    rewards (None when none scored), and ``failures`` (calls and failure counters of the pool).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.resolve() == output_path.resolve():
        raise UserError(f"--output {output_path} is the input file; choose another path")
    if not output_path.parent.is_dir():
        raise UserError(f"output folder {output_path.parent} does not exist; create it first")
    rows = read_rows(input_path)
    spec = RewardSpec(name=reward, timeout_s=timeout_s)
    names = column_names(rows)
    values: list[float | None] = []
    with RewardPool([spec], workers=workers) as pool:
        for start in range(0, len(rows), batch_size):
            prompts, completions, ids, columns = _batch_arguments(rows[start:start + batch_size], names)
            values.extend(pool.score(prompts, completions, ids, columns).per_function[reward])
        failures = pool.counts()[reward]
    with output_path.open("w", encoding="utf-8") as handle:
        for row, value in zip(rows, values):
            handle.write(json.dumps({**row, OUTPUT_KEY: value}, ensure_ascii=False) + "\n")
    scored = [v for v in values if v is not None]
    mean = sum(scored) / len(scored) if scored else None
    return {"count": len(rows), "scored": len(scored), "mean": mean, "failures": failures}
