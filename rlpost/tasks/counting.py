"""Counting up by one, `"n:"` -> `"n+1,n+2,...,n+k"`: a long-answer task a 20M model learns in minutes.

Layout: every number has `width` digits, zero-padded and written least significant digit first
(the layout of `rlpost.tasks.arithmetic`), so 0479 counted on twice is `"9740:"` -> `"0840,1840"`.
Each digit of a number then sits exactly `width + 1` tokens after the same digit of the number
before it, and the first number's after the prompt's: the rule is local and the same at every
position, which is why SFT learns it in a few hundred steps on a CPU (docs/benchmarks.md), where
long addition's operands sit hundreds of tokens back and SFT took hours.

Why RL helps, as in the quickstart: the SFT demonstrator is careless and forgets each carry with
probability `carry_slip` (0.75), then counts on from what it wrote. A carry out of the last digit
happens when it passes 9, so with `numbers` = 6 about 60% of problems need one (the start's last
digit is 4 or more) and greedy decoding of the imitating policy drops it: the SFT policy is right
on about the 40% that need none. Sampling at temperature 1 writes the carry about a quarter of the
time, the exact verifier rewards it, and one rule shared by every problem is there to be learned.

Prompts are a pure function of `(seed, index)`; held-out starts are those whose hash falls into a
fixed slice, and training prompts and demonstrations never use them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlpost.tasks.arithmetic import (_DRAWS_PER_PROBLEM, distinct_draws, in_held_out_slice, read_number,
                                     training_share, write_number, written_sum)


@dataclass(frozen=True)
class CountProblem:
    """Count `numbers` steps up from `start`; every number `width` digits, least significant first."""

    start: int
    width: int
    numbers: int

    @property
    def prompt(self) -> str:
        return f"{write_number(self.start, self.width)}:"

    @property
    def answer(self) -> str:
        return ",".join(write_number(self.start + i, self.width) for i in range(1, self.numbers + 1))

    def written(self, slips: list[tuple[bool, ...]]) -> str:
        """The count as a demonstrator writes it who, in step i, drops the carry out of column k when
        `slips[i][k]`, and counts on from the number it wrote."""
        out, previous = [], self.start
        for step_slips in slips:
            text = written_sum(previous, 1, True, step_slips, width=self.width + 1)[: self.width]
            out.append(text)
            previous = read_number(text, self.width)
        return ",".join(out)

    def columns(self) -> dict[str, int]:
        """The dataset columns of this problem, for evaluation rows."""
        return {"start": self.start}


@dataclass(frozen=True)
class CountingTask:
    """Counting tasks of `numbers` numbers of `width` digits; `held_out_percent` of starts are test-only."""

    width: int = 21
    numbers: int = 6
    held_out_percent: int = 12
    carry_slip: float = 0.0

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if not 1 <= self.numbers < 10 ** self.width:
            raise ValueError(f"numbers must be in [1, 10**width), got {self.numbers}")

    @property
    def prompt_length(self) -> int:
        """Tokens in a prompt: the start and ':'."""
        return self.width + 1

    @property
    def answer_length(self) -> int:
        """Tokens in an answer: `numbers` numbers and the commas between them."""
        return self.numbers * (self.width + 1) - 1

    @property
    def pool_size(self) -> int:
        """About how many distinct training problems exist (starts below 10**width - numbers, less the
        held-out slice); never enumerated."""
        return int((10 ** self.width - self.numbers) * training_share(self.held_out_percent))

    def _problem(self, start: int) -> CountProblem:
        return CountProblem(start, self.width, self.numbers)

    def _draw_where(self, rng: random.Random, held_out: bool) -> int:
        for _ in range(_DRAWS_PER_PROBLEM):
            start = rng.randrange(10 ** self.width - self.numbers)  # no count passes 10**width
            if in_held_out_slice(f"count:{start}", self.held_out_percent) == held_out:
                return start
        side = "held-out" if held_out else "training"
        raise ValueError(f"no {side} start in {_DRAWS_PER_PROBLEM} draws (held_out_percent={self.held_out_percent})")

    def _distinct_starts(self, rng: random.Random, count: int, held_out: bool):
        what = "held-out starts" if held_out else "training problems"
        return distinct_draws(lambda: self._draw_where(rng, held_out), count, what)

    def train_problem(self, seed: int, index: int) -> CountProblem:
        """The `index`-th training prompt of the stream `seed` (never a held-out start)."""
        return self._problem(self._draw_where(random.Random(f"count:{seed}:{index}"), held_out=False))

    def demonstrations(self, count: int, seed: int) -> list[tuple[str, str]]:
        """`count` (prompt, completion) demonstrations on distinct training problems, written by the
        careless demonstrator (each carry forgotten with probability `carry_slip`)."""
        rng = random.Random(f"count-demos:{seed}")
        demos = []
        for start in self._distinct_starts(rng, count, held_out=False):
            problem = self._problem(start)
            slips = [tuple(rng.random() < self.carry_slip for _ in range(self.width)) for _ in range(self.numbers)]
            demos.append((problem.prompt, problem.written(slips)))
        return demos

    def answer_for(self, prompt: str) -> str:
        """The correct answer to a prompt `"n:"` of this task."""
        return self._problem(read_number(prompt.rstrip(":"), self.width)).answer

    def held_out(self, count: int, seed: int = 0) -> list[CountProblem]:
        """`count` distinct held-out problems (evaluation only), a prefix of any longer list."""
        rng = random.Random(f"count-held-out:{seed}")
        return [self._problem(start) for start in self._distinct_starts(rng, count, held_out=True)]
