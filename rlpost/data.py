"""Read training prompt datasets into rows, and serve them as a resumable prompt stream.

`read_rows(source, ...)` returns a list of row dicts, each with a non-empty text `prompt` column
plus every other column of the dataset unchanged (they reach reward functions as keyword
columns, TRL's convention). `source` is one of
  - a `.jsonl` file, a `.parquet` file, or a directory written by `datasets.save_to_disk`
    (relative paths are resolved against `base_dir`, default the current directory);
  - a vendored split: `gsm8k-train` (7473 rows), `gsm8k-test` (1319 rows), `ifeval` (541 rows).
GSM8K rows hold `prompt` (the zero-shot evaluation prompt, `benchmarks.gsm8k_prompt`), `question`,
`solution` (the full worked solution) and `answer` (its final number); IFEval rows hold `prompt`,
`key`, `instruction_id_list` and `kwargs` (what `rewards.ifeval` reads).
A built-in split name wins over a file of that name (write `./ifeval` for the file).
`columns` maps target -> dataset column, e.g. {"prompt": "question"}: mapped columns are renamed
(replacing any column already named like the target); all others are kept.

`DatasetPrompts` serves rows as a `rollouts.prompts.PromptSource`: index i is position i % n of
epoch i // n, each epoch a fresh permutation seeded by (seed, epoch), so every epoch visits every
row once and a stream resumed at index i continues exactly where it stopped.

Every problem with the input is a one-line `UserError` naming the file, row and column to fix.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlpost.errors import UserError
from rlpost.evaluation import benchmarks

PROMPT = "prompt"
_FILE_SUFFIXES = (".jsonl", ".parquet")


# ---------------------------------------------------------------- vendored splits


def _gsm8k_rows(split: str) -> list[dict[str, Any]]:
    """GSM8K rows of the vendored `split` file (see the module docstring for the columns)."""
    rows = []
    for row in benchmarks.read_jsonl(benchmarks.vendored_path(f"gsm8k/{split}.jsonl")):
        rows.append({
            PROMPT: benchmarks.gsm8k_prompt(row["question"]),
            "question": row["question"],
            "solution": row["answer"],
            "answer": benchmarks.gsm8k_final_answer(row["answer"]),
        })
    return rows


def _ifeval_rows() -> list[dict[str, Any]]:
    """IFEval prompts with the instruction columns the IFEval reward reads."""
    wanted = (PROMPT, "key", "instruction_id_list", "kwargs")
    return [{c: row[c] for c in wanted} for row in benchmarks.load_ifeval().rows]


SPLITS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "gsm8k-train": functools.partial(_gsm8k_rows, "train"),
    "gsm8k-test": functools.partial(_gsm8k_rows, "test"),
    "ifeval": _ifeval_rows,
}


# ---------------------------------------------------------------- files


def _resolve(source: str, base_dir: Path | None) -> Path:
    """The dataset path; UserError if it does not exist (naming a split when it looks like one)."""
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    if path.exists():
        return path
    looks_like_name = not path.suffix and "/" not in source and "\\" not in source
    if looks_like_name:
        raise UserError(f"dataset {source!r} is neither a built-in split nor a file in {path.parent}; "
                        f"use one of {', '.join(SPLITS)} or a path to {benchmarks.USER_FORMATS}")
    raise UserError(f"dataset {path} does not exist; check the path")


def _utf8_error(path: Path) -> UserError:
    """The error for a file that is not UTF-8, naming the line and byte offset of the first bad byte."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        return UserError(f"{path} is not UTF-8 text: line {line}, byte offset {err.start} "
                         f"({err.reason}); re-save the file as UTF-8")
    return UserError(f"{path} could not be decoded as UTF-8; re-save the file as UTF-8")


def _read_file_rows(path: Path, split: str | None) -> list[dict[str, Any]]:
    """Rows of a JSONL file, Parquet file or `save_to_disk` directory."""
    if not path.is_dir() and path.suffix not in _FILE_SUFFIXES:
        raise UserError(f"{path}: unsupported dataset file type {path.suffix or '(none)'!r}; "
                        f"use {benchmarks.USER_FORMATS}")
    if not path.is_dir() and split is not None:
        raise UserError(f"{path} is a single file without splits; remove split={split!r}")
    try:
        return benchmarks._read_user_rows(path, split)
    except UnicodeDecodeError:
        raise _utf8_error(path) from None
    except (OSError, ValueError) as err:  # a corrupt Parquet file raises ArrowInvalid, a ValueError
        reason = " ".join(str(err).split())
        raise UserError(f"{path} cannot be read ({reason}); check or re-write the file") from None


# ---------------------------------------------------------------- columns


def _check_mapping(rows: list[dict[str, Any]], columns: dict[str, str], where: str) -> None:
    """Every mapped source column must exist in the dataset (checked on its first row)."""
    existing = list(rows[0])
    for target, source in columns.items():
        if source not in existing:
            raise UserError(f"{where}: column {source!r} (mapped to {target!r}) not found; "
                            f"columns are: {', '.join(existing)}; fix the column mapping")


def _map_row(row: dict[str, Any], columns: dict[str, str], index: int, where: str) -> dict[str, Any]:
    """The row with mapped columns renamed and all others kept; its prompt checked."""
    missing = [source for source in columns.values() if source not in row]
    if missing:
        raise UserError(f"{where}: row {index} has no column {missing[0]!r}; "
                        f"its columns are: {', '.join(row) or 'none'}")
    renamed = set(columns.values())
    mapped = {k: v for k, v in row.items() if k not in renamed}
    mapped.update({target: row[source] for target, source in columns.items()})
    _check_prompt(mapped, row, columns.get(PROMPT, PROMPT), index, where)
    return mapped


def _check_prompt(mapped: dict[str, Any], row: dict[str, Any], column: str, index: int,
                  where: str) -> None:
    """UserError unless the mapped row has a non-empty text prompt."""
    has = ", ".join(map(str, row)) or "none"
    prompt = mapped.get(PROMPT)
    if column not in row:
        raise UserError(f"{where}: row {index} has no prompt column {column!r}; its columns are: {has}; "
                        f"map one with columns={{'prompt': NAME}}")
    if not isinstance(prompt, str):
        raise UserError(f"{where}: row {index} column {column!r} holds {type(prompt).__name__}, "
                        f"not prompt text; its columns are: {has}; map a text column to 'prompt'")
    if not prompt.strip():
        raise UserError(f"{where}: row {index} has an empty prompt in column {column!r}; "
                        f"its columns are: {has}; fill it in or drop the row")


def read_rows(
    source: str,
    *,
    split: str | None = None,
    columns: dict[str, str] | None = None,
    base_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """The rows of a prompt dataset, each with a non-empty `prompt` (see the module docstring).

    split: the split of a `save_to_disk` DatasetDict (needed when it holds more than one).
    columns: target -> dataset column renames, e.g. {"prompt": "question"}.
    """
    columns = dict(columns or {})
    if source in SPLITS:
        if split is not None:
            raise UserError(f"{source} is a built-in split already; remove split={split!r}")
        rows, where = SPLITS[source](), source
    else:
        path = _resolve(source, base_dir)
        rows, where = _read_file_rows(path, split), str(path)
    if not rows:
        raise UserError(f"dataset {where} has no rows; give a dataset with at least one prompt")
    _check_mapping(rows, columns, where)
    return [_map_row(row, columns, i, where) for i, row in enumerate(rows)]


# ---------------------------------------------------------------- prompt stream


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The row order of one epoch: a permutation of range(n) seeded by (seed, epoch)."""
    import numpy as np

    return tuple(int(i) for i in np.random.default_rng([seed, epoch]).permutation(n))


@dataclass(frozen=True)
class DatasetPrompts:
    """A `PromptSource` over dataset rows: index i is row perm_(i // n)[i % n] (see module docstring).

    `get(i)` returns the row's raw prompt text (before any `PromptFormat`) and all its other
    columns. Picklable, so it can be sent to a spawned rollout process.
    """

    rows: tuple[dict[str, Any], ...]
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.rows:
            raise UserError("DatasetPrompts needs at least one row")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise UserError(f"the prompt shuffle seed must be an integer >= 0, got {self.seed!r}")
        object.__setattr__(self, "rows", tuple(self.rows))

    @classmethod
    def read(cls, source: str, *, seed: int = 0, split: str | None = None,
             columns: dict[str, str] | None = None, base_dir: Path | None = None) -> "DatasetPrompts":
        """The prompt stream of `read_rows(source, ...)`, shuffled by `seed`."""
        return cls(tuple(read_rows(source, split=split, columns=columns, base_dir=base_dir)), seed)

    def __len__(self) -> int:
        return len(self.rows)

    def row_index(self, index: int) -> int:
        """Which row stream position `index` serves."""
        if index < 0:
            raise IndexError(f"prompt index must be >= 0, got {index}")
        epoch, position = divmod(index, len(self.rows))
        return _permutation(len(self.rows), self.seed, epoch)[position]

    def get(self, index: int) -> tuple[str, dict[str, Any]]:
        row = self.rows[self.row_index(index)]
        return row[PROMPT], {k: v for k, v in row.items() if k != PROMPT}
