"""n-gram decontamination: planted overlaps are found exactly; a naive search agrees."""

import random

import pytest

from rlpost.errors import UserError
from rlpost.evaluation.decontaminate import (
    contaminated_indices,
    find_overlaps,
    ngrams,
    normalise_words,
)


def test_normalisation_and_ngrams():
    assert normalise_words("Janet\u2019s DUCKS, lay 16-eggs!\n") == ["janet", "s", "ducks", "lay", "16", "eggs"]
    assert normalise_words("snake_case \uff21") == ["snake", "case", "a"]  # NFKC folds fullwidth A
    ten = " ".join(f"w{i}" for i in range(10))
    assert ngrams(ten, 8) == ["w0 w1 w2 w3 w4 w5 w6 w7", "w1 w2 w3 w4 w5 w6 w7 w8", "w2 w3 w4 w5 w6 w7 w8 w9"]
    assert ngrams("Only three words.", 8) == ["only three words"]
    assert ngrams(" ?! ", 8) == []


def _random_text(rng, length, tag):
    return " ".join(f"{tag}{rng.randrange(10**6)}" for _ in range(length))


def test_planted_overlaps_are_found_exactly():
    rng = random.Random(0)
    bench = [_random_text(rng, 40, "b") for _ in range(30)]
    train = [_random_text(rng, 60, "t") for _ in range(200)]
    planted = {}
    for train_index, bench_index in [(3, 7), (50, 0), (51, 29), (199, 7)]:
        words = bench[bench_index].split()
        start = rng.randrange(len(words) - 8)
        span = words[start : start + 8]
        loud = ", ".join(w.upper() for w in span) + "!"  # case and punctuation must not matter
        train[train_index] = f"{train[train_index]} {loud} {_random_text(rng, 5, 't')}"
        planted[(train_index, bench_index)] = " ".join(span)
    near_miss = bench[12].split()[:7]  # a 7-word span is below n=8
    train[100] = train[100] + " " + " ".join(near_miss)
    overlaps = find_overlaps(train, bench, n=8)
    assert {(o.train_index, o.bench_index): o.ngram for o in overlaps} == planted
    assert contaminated_indices(overlaps) == [3, 50, 51, 199]
    assert all(o.shared == 1 and o.ratio == pytest.approx(1 / 33) for o in overlaps)


def _naive(train, bench, n, min_ratio):
    """Pairwise comparison of n-gram sets, with no index."""
    found = {}
    for i, t in enumerate(train):
        t_grams = set(ngrams(t, n))
        for j, b in enumerate(bench):
            b_grams = set(ngrams(b, n))
            shared = t_grams & b_grams
            if shared and len(shared) / len(b_grams) >= min_ratio:
                found[(i, j)] = len(shared)
    return found


@pytest.mark.parametrize("n,min_ratio", [(2, 0.0), (3, 0.0), (3, 0.2), (1, 0.5)])
def test_agrees_with_naive_pairwise_search(n, min_ratio):
    rng = random.Random(n)
    vocab = [f"v{i}" for i in range(12)]  # small vocabulary: many natural overlaps
    bench = [" ".join(rng.choices(vocab, k=rng.randint(1, 12))) for _ in range(25)]
    train = [" ".join(rng.choices(vocab, k=rng.randint(1, 15))) for _ in range(60)]
    overlaps = find_overlaps(train, bench, n=n, min_ratio=min_ratio)
    expected = _naive(train, bench, n, min_ratio)
    assert expected  # the test data does contain overlaps
    assert {(o.train_index, o.bench_index): o.shared for o in overlaps} == expected
    for o in overlaps:
        assert o.ngram in ngrams(bench[o.bench_index], n)
        bench_grams = ngrams(bench[o.bench_index], n)
        assert o.ngram == next(g for g in ngrams(train[o.train_index], n) if g in bench_grams)


def test_min_ratio_threshold():
    bench = ["a b c d e f g h i j"]  # 3 distinct 8-grams
    train = ["x a b c d e f g h y"]  # shares exactly the first one
    assert [o.ratio for o in find_overlaps(train, bench)] == [pytest.approx(1 / 3)]
    assert find_overlaps(train, bench, min_ratio=0.3) != []
    assert find_overlaps(train, bench, min_ratio=0.34) == []
    with pytest.raises(UserError):
        find_overlaps(train, bench, n=0)
    with pytest.raises(UserError):
        find_overlaps(train, bench, min_ratio=1.5)


def test_short_texts_match_only_exact_duplicates():
    bench = ["What is 2 + 2?", "A much longer benchmark question with more than eight words in it."]
    train = ["what is 2+2", "What is 2 + 2 ?", "2 + 2", "what is 3 + 2", "what is 2 + 2 + 2"]
    # punctuation becomes spaces, so the first two are "what is 2 2" like the benchmark row
    assert [(o.train_index, o.bench_index) for o in find_overlaps(train, bench)] == [(0, 0), (1, 0)]


def test_recipe_reports_planted_benchmark_rows_before_training(tmp_path):
    import json

    from types import SimpleNamespace

    from rlpost.evaluation.benchmarks import load_benchmark
    from rlpost.stages.sft import _report_contamination

    planted = load_benchmark("gsm8k", limit=3).rows[2]["question"]
    ctx = SimpleNamespace(recipe=SimpleNamespace(data=SimpleNamespace(decontaminate_against=["gsm8k"])),
                          out_dir=tmp_path)
    _report_contamination(["57+68=125", f"Q: {planted} A: 7", "1+1=2"], ctx)
    report = json.loads((tmp_path / "decontamination.json").read_text())
    assert report["contaminated_train_indices"] == [1]
    assert report["benchmarks"]["gsm8k"]["contaminated_benchmark_rows"] >= 1
