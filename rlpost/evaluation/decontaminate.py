"""Training/benchmark overlap by word n-grams (the Tulu 3 decontamination practice).

Text normalisation: Unicode NFKC, lowercase, every character that is not a letter, digit or
whitespace replaced by a space, then split on whitespace. A text's n-grams are its runs of n
consecutive words; a text with fewer than n words (but at least one) has one n-gram, the whole
text, so exact duplicates of short texts are still caught.

A (training row, benchmark row) pair overlaps when they share at least one n-gram and, if
`min_ratio` > 0, when the shared distinct n-grams are at least `min_ratio` of the benchmark row's
distinct n-grams:  |G(train) & G(bench)| / |G(bench)| >= min_ratio.
The default (n=8, min_ratio=0: any shared 8-gram) is the strict Tulu 3 setting.

Cost: one pass over the benchmark builds a dict n-gram -> benchmark rows (n-grams are hashed by
the dict); one pass over the training rows looks up each of their n-grams: O(total words * n).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from rlpost.errors import UserError

_NON_WORD = re.compile(r"[^\w\s]|_")


@dataclass(frozen=True)
class Overlap:
    """Training row `train_index` shares n-grams with benchmark row `bench_index`.

    ngram: the first shared n-gram in the training text (words joined by spaces);
    shared: number of distinct shared n-grams; ratio: shared / distinct n-grams of the bench row.
    """

    train_index: int
    bench_index: int
    ngram: str
    shared: int
    ratio: float


def normalise_words(text: str) -> list[str]:
    """NFKC, lowercase, punctuation -> space, split on whitespace."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split()


def ngrams(text: str, n: int = 8) -> list[str]:
    """The word n-grams of `text` in order (duplicates kept), each joined by single spaces."""
    words = normalise_words(text)
    if not words:
        return []
    if len(words) < n:
        return [" ".join(words)]
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def build_index(bench_texts: Iterable[str], n: int = 8) -> tuple[dict[str, list[int]], list[int]]:
    """Map each benchmark n-gram to the benchmark rows containing it; also each row's count of
    distinct n-grams."""
    index: dict[str, list[int]] = defaultdict(list)
    sizes = []
    for bench_index, text in enumerate(bench_texts):
        grams = set(ngrams(text, n))
        sizes.append(len(grams))
        for gram in grams:
            index[gram].append(bench_index)
    return dict(index), sizes


def find_overlaps(
    train_texts: Sequence[str], bench_texts: Sequence[str], n: int = 8, min_ratio: float = 0.0
) -> list[Overlap]:
    """All overlapping (train, bench) pairs, sorted by train then bench index (see module doc)."""
    if n < 1:
        raise UserError(f"n-gram size must be >= 1, got {n}")
    if not 0.0 <= min_ratio <= 1.0:
        raise UserError(f"min_ratio must be in [0, 1], got {min_ratio}")
    index, sizes = build_index(bench_texts, n)
    overlaps = []
    for train_index, text in enumerate(train_texts):
        shared: Counter[int] = Counter()
        first: dict[int, str] = {}
        for gram in dict.fromkeys(ngrams(text, n)):  # distinct, in order of appearance
            for bench_index in index.get(gram, ()):
                shared[bench_index] += 1
                first.setdefault(bench_index, gram)
        for bench_index in sorted(shared):
            ratio = shared[bench_index] / sizes[bench_index]
            if ratio >= min_ratio:
                count = shared[bench_index]
                overlaps.append(Overlap(train_index, bench_index, first[bench_index], count, ratio))
    return overlaps


def contaminated_indices(overlaps: Iterable[Overlap]) -> list[int]:
    """Sorted distinct training-row indices that appear in `overlaps` (the rows to drop)."""
    return sorted({o.train_index for o in overlaps})


# ---------------------------------------------------------------- training data vs benchmarks

BENCHMARK_TEXT_FIELD = {"gsm8k": "question"}  # default field per benchmark (others: "prompt")
_EXAMPLE_CHARS = 200


def text_of(value: object) -> str:
    """A row value as text: a string as is, a chat (list of {'content': ...}) as its joined
    contents, anything else as its `str`."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return "\n".join(str(m.get("content", "")) for m in value)
    return "" if value is None else str(value)


def _split_field(spec: str) -> tuple[str, str | None]:
    """'gsm8k:solution' -> ('gsm8k', 'solution'); 'gsm8k' -> ('gsm8k', None)."""
    name, sep, field = spec.rpartition(":")
    return (name, field) if sep and name and field.isidentifier() else (spec, None)


def benchmark_texts(spec: str) -> tuple[str, str, list[str]]:
    """(name, field, texts) of a benchmark named as 'NAME' or 'NAME:FIELD'.

    The default field is the question a model is shown, without instructions or few-shot
    examples (gsm8k: 'question'; others: 'prompt'), so shared boilerplate does not count.
    """
    import rlpost.evaluation.addition  # noqa: F401  (registers the `addition` benchmark)
    from rlpost.evaluation.benchmarks import load_benchmark

    name, field = _split_field(spec.strip())
    field = field or BENCHMARK_TEXT_FIELD.get(name, "prompt")
    rows = load_benchmark(name).rows
    if rows and field not in rows[0]:
        raise UserError(f"benchmark {name!r} has no field {field!r}; its fields: {', '.join(rows[0])}")
    return name, field, [text_of(row.get(field)) for row in rows]


def _clip(text: str) -> str:
    return text if len(text) <= _EXAMPLE_CHARS else text[:_EXAMPLE_CHARS] + "..."


def check_contamination(
    train_texts: Sequence[str], benchmark_names: Sequence[str], n: int = 8,
    min_ratio: float = 0.0, max_examples: int = 5,
) -> dict:
    """Overlap of training texts with each named benchmark ('NAME' or 'NAME:FIELD').

    Returns {"n", "min_ratio", "train_rows", "contaminated_train_rows" (all benchmarks),
    "contaminated_train_indices", "benchmarks": {name: {"field", "rows", "overlapping_pairs",
    "contaminated_train_rows", "contaminated_benchmark_rows", "examples": [...]}}}; each example
    holds the two row indices, the first shared n-gram, the shared count and ratio, and both texts
    (clipped to 200 characters). A training recipe can drop `contaminated_train_indices`.
    """
    if not benchmark_names:
        raise UserError("name at least one benchmark to check against, e.g. gsm8k")
    texts = [text_of(t) for t in train_texts]
    report, dirty = {}, set()
    for spec in benchmark_names:
        name, field, bench = benchmark_texts(spec)
        overlaps = find_overlaps(texts, bench, n=n, min_ratio=min_ratio)
        rows = contaminated_indices(overlaps)
        dirty.update(rows)
        report[spec] = {
            "benchmark": name, "field": field, "rows": len(bench), "overlapping_pairs": len(overlaps),
            "contaminated_train_rows": len(rows),
            "contaminated_benchmark_rows": len({o.bench_index for o in overlaps}),
            "examples": [{"train_index": o.train_index, "bench_index": o.bench_index, "ngram": o.ngram,
                          "shared": o.shared, "ratio": o.ratio, "train_text": _clip(texts[o.train_index]),
                          "bench_text": _clip(bench[o.bench_index])} for o in overlaps[:max_examples]],
        }
    return {"n": n, "min_ratio": min_ratio, "train_rows": len(texts), "contaminated_train_rows": len(dirty),
            "contaminated_train_indices": sorted(dirty), "benchmarks": report}
