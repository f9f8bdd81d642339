"""Tests for the isolated reward pool: hostile functions are contained, counted and logged once,
and a sample that lost a value to a failure is masked (total None), never scored 0."""

from __future__ import annotations

import logging
import math
import multiprocessing
import time

import pytest

from rewards.pool import RewardPool, _call_in_worker, _clean_value, latency_percentiles
from rewards.registry import RewardSpec
from rlpost.errors import UserError

try:
    import reward_fixtures as fx
except ImportError:  # tests/ collected as a package
    from tests import reward_fixtures as fx

FX = fx.__name__
GOOD = f"{FX}:length_reward"
COMPLETIONS = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "ggggggg"]
PROMPTS = ["p"] * len(COMPLETIONS)


@pytest.fixture
def make_pool():
    pools = []

    def make(*specs, **kwargs):
        pool = RewardPool(list(specs), **kwargs)
        pool.start()
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def test_latency_percentiles_hand_computed():
    # rank r = p/100 * (n - 1) on [1, 2, 3, 4]: p50 r=1.5 -> 2.5, p90 r=2.7 -> 3.7, p99 r=2.97 -> 3.97
    got = latency_percentiles([4.0, 1.0, 3.0, 2.0])
    assert got == pytest.approx({"p50": 2.5, "p90": 3.7, "p99": 3.97, "max": 4.0})
    assert latency_percentiles([0.5]) == {"p50": 0.5, "p90": 0.5, "p99": 0.5, "max": 0.5}
    assert latency_percentiles([]) == {}


@pytest.mark.parametrize("raw, clean", [(3, 3.0), (True, 1.0), (-0.5, -0.5), (float("nan"), None),
                                        (float("inf"), None), ("1.0", None), ([1.0], None),
                                        (object(), None), (10**400, None)])
def test_clean_value(raw, clean):
    assert _clean_value(raw) == clean


def test_good_async_and_column_functions_with_weights(make_pool):
    pool = make_pool(RewardSpec(GOOD, weight=2.0), RewardSpec(f"{FX}:async_length_reward", weight=0.25),
                     RewardSpec(f"{FX}:match_answer_reward", weight=-1.0), workers=2)
    result = pool.score(["p"] * 3, ["a", "bb", "ccc"], [[1], [2, 2], [3, 3, 3]],
                        {"answer": ["a", "x", "ccc"]})
    assert result.per_function[GOOD] == [1.0, 2.0, 3.0]
    assert result.per_function[f"{FX}:async_length_reward"] == [2.0, 4.0, 6.0]
    assert result.per_function[f"{FX}:match_answer_reward"] == [1.0, 0.0, 1.0]
    # total = 2 * len + 0.25 * 2 * len - match  ->  2.5 - 1, 5.0 - 0, 7.5 - 1
    assert result.total == pytest.approx([1.5, 5.0, 6.5])
    assert result.applicable == [True, True, True]
    assert result.failed == [False, False, False] and result.masked == 0
    assert pool.counts()[GOOD] == {"calls": 2, "timeouts": 0, "exceptions": 0, "crashes": 0,
                                   "wrong_length": 0, "nan": 0}


def test_a_function_that_declares_max_rows_per_call_never_gets_a_larger_call(make_pool):
    """code_tests declares it so that a call's rows fit its timeout (rewards/code_verifier.py)."""
    pool = make_pool(RewardSpec(f"{FX}:call_size_reward"), RewardSpec(GOOD), workers=1)
    assert pool.max_rows_per_call == 3
    result = pool.score(PROMPTS, COMPLETIONS, None)  # 7 rows, one worker: calls of 3, 3 and 1
    assert result.per_function[f"{FX}:call_size_reward"] == [3.0] * 6 + [1.0]
    assert pool.counts()[GOOD]["calls"] == 3  # every function is called on the same chunks


def test_all_none_sample_is_masked(make_pool):
    pool = make_pool(RewardSpec(f"{FX}:odd_only_reward", weight=0.5), workers=1)
    result = pool.score(["p", "p", "p"], ["a", "bb", "ccc"])
    assert result.per_function[f"{FX}:odd_only_reward"] == [10.0, None, 10.0]
    assert result.total == [5.0, None, 5.0]  # no function applies to "bb": no reward, not 0
    assert result.applicable == [True, False, True]
    assert result.failed == [False, False, False] and result.masked == 1
    assert pool.stats()["reward/samples"] == 3.0 and pool.stats()["reward/masked_samples"] == 1.0


def test_none_beside_a_value_is_not_applicable_not_masked(make_pool):
    odd = f"{FX}:odd_only_reward"
    pool = make_pool(RewardSpec(GOOD), RewardSpec(odd, weight=0.5), workers=1)
    result = pool.score(["p", "p", "p"], ["a", "bb", "ccc"])
    # total = len + 0.5 * 10 where odd_only applies (odd lengths), len alone where it returns None
    assert result.total == [6.0, 2.0, 8.0]
    assert result.masked == 0 and result.failed == [False, False, False]


def test_a_failed_function_masks_its_samples_instead_of_scoring_zero(make_pool):
    bad = f"{FX}:raising_reward"
    pool = make_pool(RewardSpec(bad), workers=1)
    result = pool.score(["p", "p"], ["a", "bb"])
    assert result.per_function[bad] == [None, None]
    assert result.total == [None, None] and result.masked == 2
    assert result.failed == [True, True] and result.applicable == [False, False]


HOSTILE = [
    ("sleep_forever_reward", "timeouts"),
    ("raising_reward", "exceptions"),
    ("exiting_reward", "exceptions"),
    ("abort_reward", "crashes"),
    ("wrong_length_reward", "wrong_length"),
    ("not_a_list_reward", "wrong_length"),
    ("hostile_object_reward", "exceptions"),
]


@pytest.mark.parametrize("fixture, kind", HOSTILE)
def test_hostile_function_is_contained_and_counted(make_pool, fixture, kind):
    bad = f"{FX}:{fixture}"
    pool = make_pool(RewardSpec(GOOD), RewardSpec(bad, weight=3.0, timeout_s=1.0),
                     workers=2, chunk_size=100)
    for _ in range(2):  # the pool keeps working after the failure
        result = pool.score(PROMPTS, COMPLETIONS)
        assert result.per_function[GOOD] == [float(len(c)) for c in COMPLETIONS]
        assert result.per_function[bad] == [None] * len(COMPLETIONS)
        # the bad function's values are lost: masked, not the sum of the functions that worked
        assert result.total == [None] * len(COMPLETIONS)
        assert result.failed == [True] * len(COMPLETIONS) and result.masked == len(COMPLETIONS)
        assert result.applicable == [True] * len(COMPLETIONS)
    counts = pool.counts()
    zeros = {k: 0 for k in counts[GOOD] if k != "calls"}
    assert counts[bad] == {"calls": 2, **zeros, kind: 2}
    assert counts[GOOD]["calls"] == 2 and sum(counts[GOOD].values()) == 2
    assert pool.stats()[f"reward/{FX}_{fixture}/{kind}"] == 2.0
    assert pool.stats()["reward/masked_samples"] == pool.stats()["reward/samples"] == 2.0 * len(COMPLETIONS)


def test_garbage_values_become_none_one_by_one(make_pool):
    bad = f"{FX}:garbage_values_reward"
    pool = make_pool(RewardSpec(bad, weight=2.0), workers=1)
    result = pool.score(PROMPTS, COMPLETIONS)
    # cycle: nan, 5.0, inf, '1.0', None, -inf, 7 -> four bad values, one genuine None
    assert result.per_function[bad] == [None, 5.0, None, None, None, None, 7.0]
    assert result.failed == [True, False, True, True, False, True, False]
    assert result.total == [None, 10.0, None, None, None, None, 14.0]  # the None applies to nothing
    assert result.masked == 5
    assert pool.counts()[bad]["nan"] == 4
    pool.score(PROMPTS, COMPLETIONS)
    assert pool.counts()[bad]["nan"] == 8


def test_a_hang_costs_only_its_chunk(make_pool):
    bad = f"{FX}:hang_on_marker_reward"
    pool = make_pool(RewardSpec(bad, timeout_s=1.0), workers=2, chunk_size=2)
    result = pool.score(["p"] * 5, ["a", "b", "HANG", "c", "d"])
    assert result.per_function[bad] == [1.0, 1.0, None, None, 1.0]
    assert result.total == [1.0, 1.0, None, None, 1.0]
    assert result.failed == [False, False, True, True, False] and result.masked == 2
    assert pool.counts()[bad]["timeouts"] == 1 and pool.counts()[bad]["calls"] == 3


def test_each_failure_kind_is_logged_once_per_function(make_pool, caplog):
    names = [f"{FX}:raising_reward", f"{FX}:wrong_length_reward", f"{FX}:abort_reward"]
    pool = make_pool(RewardSpec(GOOD), *(RewardSpec(n) for n in names), workers=2, chunk_size=100)
    with caplog.at_level(logging.WARNING, logger="rlpost.rewards"):
        for _ in range(3):
            pool.score(PROMPTS, COMPLETIONS)
    records = [r.getMessage() for r in caplog.records if r.name == "rlpost.rewards"]
    assert len(records) == 3
    for name, word in zip(names, ["exceptions", "wrong_length", "crashes"]):
        assert sum(name in r and f"({word})" in r for r in records) == 1
    assert "reward fixture exploded" in " ".join(records)
    assert pool.counts()[names[2]]["crashes"] == 3


def test_stats_are_flat_floats(make_pool):
    pool = make_pool(RewardSpec(GOOD), workers=1)
    pool.score(PROMPTS, COMPLETIONS)
    stats = pool.stats()
    prefix = f"reward/{FX}_length_reward"
    assert stats[f"{prefix}/calls"] == 1.0 and stats[f"{prefix}/timeouts"] == 0.0
    assert stats["reward/samples"] == float(len(COMPLETIONS)) and stats["reward/masked_samples"] == 0.0
    assert 0.0 <= stats[f"{prefix}/latency_p50_s"] <= stats[f"{prefix}/latency_max_s"] < 1.0
    assert all(isinstance(v, float) for v in stats.values())


def test_unknown_or_broken_function_fails_at_start():
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        RewardPool([RewardSpec("nope")], workers=1).start()
    with pytest.raises(UserError, match="not a function"):
        with RewardPool([RewardSpec(f"{FX}:NOT_CALLABLE")], workers=1):
            pass


def test_bad_batches_and_arguments():
    pool = RewardPool([RewardSpec(GOOD)], workers=1)  # never started: checks come first
    with pytest.raises(ValueError, match="answer has 1 entries for 2"):
        pool.score(["p", "p"], ["a", "b"], None, {"answer": ["x"]})
    with pytest.raises(ValueError, match="clashes"):
        pool.score(["p"], ["a"], None, {"completions": ["x"]})
    empty = pool.score([], [])
    assert empty.total == [] and empty.masked == 0
    with pytest.raises(UserError, match="unique"):
        RewardPool([RewardSpec(GOOD), RewardSpec(GOOD)])
    with pytest.raises(UserError, match="at least one"):
        RewardPool([])


def test_close_with_a_call_in_flight_is_quick(make_pool):
    pool = make_pool(RewardSpec(GOOD), workers=1)
    future = pool._pool.schedule(_call_in_worker, args=(f"{FX}:sleep_forever_reward", 1, {
        "prompts": ["p"], "completions": ["a"], "completion_ids": None}, {}))
    time.sleep(0.5)
    assert future.running()
    start = time.monotonic()
    pool.close()
    assert time.monotonic() - start < 5.0
    assert not [p for p in multiprocessing.active_children() if p.name == "pebble_pool_worker"]
    pool.close()  # closing twice is harmless


def test_recipe_args_reach_the_function(make_pool):
    """`args` from the recipe are passed as keywords on top of the batch (e.g. a reward model's path)."""
    pool = make_pool(RewardSpec(f"{FX}:scaled_length_reward", args={"scale": 3.0}), workers=1)
    assert pool.score(["p", "p"], ["ab", "abcd"]).total == [6.0, 12.0]


def test_args_may_not_override_the_batch():
    with pytest.raises(UserError, match="may not set 'completions'"):
        RewardSpec(GOOD, args={"completions": []})
