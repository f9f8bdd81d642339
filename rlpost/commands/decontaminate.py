"""`rlpost decontaminate --train DATA[:FIELD] --benchmarks gsm8k,ifeval [--n 8]`: report n-gram overlap.

DATA is a .jsonl/.parquet file, a `save_to_disk` directory, a .txt file (one text per line), a
registered benchmark name, or `gsm8k-train` (the vendored GSM8K train split; fields question,
answer). FIELD is the column holding the text (default: prompt; gsm8k-train: question).
Each benchmark may be NAME or NAME:FIELD (default: the question shown to the model).
Exit codes: 0 done (1 with --fail-on-overlap when any row overlaps); 2 bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rlpost.errors import UserError

_ALIASES = {"gsm8k-train": "question"}


def add_arguments(parser) -> None:
    parser.add_argument("--train", required=True, metavar="DATA[:FIELD]",
                        help="training data: file, save_to_disk dir, benchmark name or gsm8k-train")
    parser.add_argument("--benchmarks", required=True, help="comma-separated benchmark names (NAME or NAME:FIELD)")
    parser.add_argument("--n", type=int, default=8, help="n-gram size in words (default 8, as Tulu 3)")
    parser.add_argument("--min-ratio", type=float, default=0.0,
                        help="also require this share of the benchmark row's n-grams (default 0: any)")
    parser.add_argument("--split", help="split of a DatasetDict directory")
    parser.add_argument("--examples", type=int, default=5, help="examples to show per benchmark")
    parser.add_argument("--json", metavar="PATH", help="write the full report as JSON ('-' for stdout)")
    parser.add_argument("--fail-on-overlap", action="store_true", help="exit 1 when any training row overlaps")


def _split(spec: str) -> tuple[str, str | None]:
    """DATA[:FIELD] -> (DATA, FIELD); an existing path containing ':' is taken whole."""
    if Path(spec).exists():
        return spec, None
    base, sep, field = spec.rpartition(":")
    return (base, field) if sep and base and field.isidentifier() else (spec, None)


def _rows_from_path(path: Path, split: str | None) -> list[dict]:
    from rlpost.evaluation.benchmarks import _read_user_rows

    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [{"text": line} for line in lines if line.strip()]
    return _read_user_rows(path, split)


def train_texts(spec: str, split: str | None = None) -> tuple[str, list[str]]:
    """(description, texts) of the training data named by DATA[:FIELD]."""
    from rlpost.evaluation.benchmarks import benchmark_names, read_jsonl, vendored_path
    from rlpost.evaluation.decontaminate import benchmark_texts, text_of

    source, field = _split(spec)
    path = Path(source)
    if path.exists():
        rows = _rows_from_path(path, split)
        field = field or ("text" if path.suffix == ".txt" else "prompt")
    elif source in _ALIASES:
        rows = read_jsonl(vendored_path("gsm8k/train.jsonl"))
        field = field or _ALIASES[source]
    elif source in benchmark_names():
        name, field, texts = benchmark_texts(spec)
        return f"benchmark {name}:{field}", texts
    else:
        raise UserError(f"--train {spec!r} is neither an existing file or directory nor a benchmark "
                        f"name ({', '.join(benchmark_names())}, gsm8k-train)")
    if not rows:
        raise UserError(f"training data {source} has no rows")
    if field not in rows[0]:
        raise UserError(f"training data {source} has no field {field!r}; its fields: {', '.join(rows[0])}; "
                        f"name one as --train {source}:FIELD")
    return f"{source}:{field}", [text_of(row.get(field)) for row in rows]


def _print_report(description: str, report: dict) -> None:
    print(f"train: {description} ({report['train_rows']} rows); {report['n']}-gram overlap"
          + (f", min ratio {report['min_ratio']}" if report["min_ratio"] else ""))
    for spec, entry in report["benchmarks"].items():
        print(f"{entry['benchmark']} ({entry['field']}, {entry['rows']} rows): "
              f"{entry['contaminated_train_rows']} training rows overlap "
              f"{entry['contaminated_benchmark_rows']} benchmark rows ({entry['overlapping_pairs']} pairs)")
        for ex in entry["examples"]:
            print(f"  train row {ex['train_index']} ~ {entry['benchmark']} row {ex['bench_index']}: "
                  f"{ex['shared']} shared n-grams ({ex['ratio']:.0%}), e.g. \"{ex['ngram']}\"")
    print(f"total: {report['contaminated_train_rows']} of {report['train_rows']} training rows "
          "overlap at least one benchmark")


def run(args) -> int:
    from rlpost.evaluation.decontaminate import check_contamination

    if args.examples < 0:
        raise UserError(f"--examples must be >= 0, got {args.examples}")
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    description, texts = train_texts(args.train, args.split)
    report = check_contamination(texts, names, n=args.n, min_ratio=args.min_ratio, max_examples=args.examples)
    report["train"] = description
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        _print_report(description, report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {args.json}")
    return 1 if args.fail_on_overlap and report["contaminated_train_rows"] else 0
