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
