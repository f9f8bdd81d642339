"""Reward functions for the reward-pool tests: one correct, the rest hostile.

They are importable (the pool resolves functions by dotted path inside its workers).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time


def length_reward(prompts, completions, completion_ids, **columns):
    """Length of each completion in characters."""
    return [float(len(c)) for c in completions]


def match_answer_reward(prompts, completions, completion_ids, answer, **columns):
    """1.0 when the completion equals the dataset column 'answer', else 0.0."""
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]


def odd_only_reward(prompts, completions, completion_ids, **columns):
    """10.0 for completions of odd length; None (not applicable) for even length."""
    return [10.0 if len(c) % 2 else None for c in completions]


async def async_length_reward(prompts, completions, completion_ids, **columns):
    """Twice the completion length, computed in a coroutine."""
    await asyncio.sleep(0)
    return [2.0 * len(c) for c in completions]


def sleep_forever_reward(prompts, completions, completion_ids, **columns):
    """Never returns."""
    while True:
        time.sleep(3600)


def hang_on_marker_reward(prompts, completions, completion_ids, **columns):
    """Never returns when a completion contains 'HANG'; otherwise 1.0 per sample."""
    if any("HANG" in c for c in completions):
        while True:
            time.sleep(3600)
    return [1.0] * len(completions)


def raising_reward(prompts, completions, completion_ids, **columns):
    """Always raises."""
    raise ValueError("reward fixture exploded")


def exiting_reward(prompts, completions, completion_ids, **columns):
    """Calls sys.exit, which must not reach the host."""
    sys.exit(3)


def abort_reward(prompts, completions, completion_ids, **columns):
    """Kills its own process."""
    os.abort()


def wrong_length_reward(prompts, completions, completion_ids, **columns):
    """Returns one value too many."""
    return [1.0] * (len(completions) + 1)


def not_a_list_reward(prompts, completions, completion_ids, **columns):
    """Returns a single float instead of a list."""
    return 1.0


def garbage_values_reward(prompts, completions, completion_ids, **columns):
    """Cycles through NaN, 5.0, inf, '1.0', None, -inf, 7 by sample index."""
    cycle = [float("nan"), 5.0, float("inf"), "1.0", None, float("-inf"), 7]
    return [cycle[i % len(cycle)] for i in range(len(completions))]


class _BadLength(list):
    def __len__(self):
        raise RuntimeError("hostile __len__")


def hostile_object_reward(prompts, completions, completion_ids, **columns):
    """Returns a list subclass whose len() raises."""
    return _BadLength([1.0] * len(completions))


NOT_CALLABLE = 42


def scaled_length_reward(prompts, completions, completion_ids=None, scale=1.0, **kwargs):
    """len(completion) * scale: a reward with a recipe argument."""
    return [len(c) * scale for c in completions]


def target_in_completion_reward(prompts, completions, completion_ids=None, target=None, **kwargs):
    """1.0 if the row's `target` column appears in the completion; raises if the column did not arrive."""
    if target is None:
        raise KeyError("the dataset column 'target' did not reach the reward function")
    return [1.0 if str(t) in c else 0.0 for c, t in zip(completions, target)]


def call_size_reward(prompts, completions, completion_ids, **columns):
    """Each sample's reward is the number of rows of the call that scored it."""
    return [float(len(completions))] * len(completions)


call_size_reward.max_rows_per_call = 3


def overflow_reward(prompts, completions, completion_ids, **columns):
    """A finite Python float beyond float32's range (3.4e38): inf once the learner makes it a tensor,
    as a reward model with unbounded outputs could give."""
    return [1e39] * len(completions)
