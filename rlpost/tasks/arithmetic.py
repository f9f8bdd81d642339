"""Two-operand addition, `"a+b="` -> `"c"`: a verifiable task small enough to learn on a CPU.

Prompts are a pure function of `(seed, index)`, so a stream of prompts can be resumed at any index
without repeating or skipping one. Held-out prompts are the pairs whose hash falls into a fixed
slice of the space; training prompts and demonstrations never use them. The checker,
`score_answer` and the reward `exact_match_reward`, lives in `rewards.arithmetic` and is
re-exported here.

Why the quickstart's RL gain is systematic, not luck
----------------------------------------------------
Layout (`reverse=True`): every number is zero-padded and written least significant digit first,
`57+68=` becomes `75+86=` with answer `521`. The k-th answer digit then sits at a fixed distance
from the two operand digits it depends on, so a small transformer learns column addition in a few
hundred SFT steps on every seed instead of after a long, seed-dependent flat phase (the natural
layout took 20 to 40+ epochs and sometimes never took off; measured in docs/benchmarks.md).

Demonstrator (`carry_slip=0.75`): the SFT demonstrations come from a careless demonstrator that
forgets each carry with probability 0.75. Imitation learns its distribution: at a carry the
policy writes the carried digit with probability ~0.25, so greedy decoding drops every carry and
the SFT policy is right only on sums without carries (~30% of problems). That gap is a property
of the data, not of floating point: SFT reaches the same plateau on every seed and machine.
The verifier, though, is exact. Sampling at temperature 1 draws the carried digit ~25% of the
time per carry, so most GRPO groups of 16 contain a correct sample; the group-normalised
advantage favours carrying, one rule shared by every problem, and RL moves the policy from
imitating the demonstrator to doing the sum.

Long answers (`LongAdditionTask`, recipe keys `data.task.digits` / `data.task.carries`)
--------------------------------------------------------------------------------------
The same task with `digits`-digit operands (127: a 256-character prompt, a 128-digit answer), for
benchmarks whose completions must be long. The 10^(2*digits) pairs cannot be enumerated, so each
problem is drawn column by column: with probability q = carries / digits the column's digit pair
carries out (a_k + b_k >= 10), else a_k + b_k <= 8, so an incoming carry never cascades. The
number of carries is Binomial(digits, q) with mean `carries`: at digits=127, carries=1 about 37%
of problems need no carry, and the careless demonstrator (which may drop the carry of any column)
leaves the SFT policy right on about those, the quickstart's story at long length.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from fractions import Fraction

from rewards.arithmetic import exact_match_reward, score_answer

__all__ = ["AdditionTask", "LongAdditionTask", "addition_task", "Problem", "written_sum", "score_answer",
           "exact_match_reward"]


@dataclass(frozen=True)
class Problem:
    """`a + b`. With `width > 0` (and `reverse`) every number is written least significant digit
    first and zero-padded: operands to `width` digits, the sum to `width + 1` (57+68 -> "75+86=", "521")."""

    a: int
    b: int
    reverse: bool = False
    width: int = 0

    @property
    def prompt(self) -> str:
        return f"{write_number(self.a, self.width)}+{write_number(self.b, self.width)}="

    @property
    def answer(self) -> str:
        return self.written(slips=())

    def written(self, slips: tuple[bool, ...]) -> str:
        """The sum as a demonstrator who drops the carries marked in `slips` writes it."""
        return written_sum(self.a, self.b, self.reverse, slips, width=self.width + 1 if self.width else 0)

    def columns(self) -> dict[str, int]:
        """The dataset columns of this problem, for evaluation rows."""
        return {"a": self.a, "b": self.b}


def write_number(n: int, width: int) -> str:
    """`n` as usual for width 0; else zero-padded to `width` digits, least significant first."""
    return f"{n:0{width}d}"[::-1] if width else str(n)


def read_number(text: str, width: int) -> int:
    """The inverse of `write_number`."""
    return int(text[::-1] if width else text)


def written_sum(a: int, b: int, reverse: bool, slips: tuple[bool, ...] = (), width: int = 0) -> str:
    """Column addition, digit by digit from the right; `slips[k]` drops the carry out of column k.

    With `reverse` the digits are written least significant first, the order column addition
    produces them in; `width > 0` pads the sum with zeros to `width` digits.
    """
    digits, carry, column = [], 0, 0
    while a or b or carry:
        total = a % 10 + b % 10 + carry
        digits.append(total % 10)
        carry = total // 10
        if carry and column < len(slips) and slips[column]:
            carry = 0
        a, b, column = a // 10, b // 10, column + 1
    digits = (digits or [0]) + [0] * (width - len(digits or [0]))
    text = "".join(map(str, digits))
    return text if reverse else text[::-1]


_DRAWS_PER_PROBLEM = 1000  # tries to find one problem outside (or inside) the held-out slice


def in_held_out_slice(key: str, held_out_percent: int) -> bool:
    """Whether the problem named `key` is test-only: the first byte of its hash falls in the slice."""
    return hashlib.sha256(key.encode()).digest()[0] * 100 // 256 < held_out_percent


def training_share(held_out_percent: int) -> Fraction:
    """The share of hash values outside the held-out slice (`in_held_out_slice`), exactly."""
    return Fraction(sum(1 for d in range(256) if d * 100 // 256 >= held_out_percent), 256)


def distinct_draws(draw, count: int, what: str):
    """`count` distinct values of `draw()`, one at a time (a caller may draw from the same generator
    between them, as the demonstrators' slips do); ValueError naming `what` if too few turn up."""
    seen: set = set()
    for _ in range(_DRAWS_PER_PROBLEM * max(count, 1)):
        if len(seen) == count:
            return
        value = draw()
        if value not in seen:
            seen.add(value)
            yield value
    if len(seen) < count:
        raise ValueError(f"found only {len(seen)} distinct {what}; asked for {count}")


def _is_held_out(a: int, b: int, held_out_percent: int) -> bool:
    return in_held_out_slice(f"{a}+{b}", held_out_percent)


@dataclass(frozen=True)
class AdditionTask:
    """Addition of two integers in `[0, max_operand]`; `held_out_percent` of all pairs are test-only."""

    max_operand: int = 99
    held_out_percent: int = 15
    reverse: bool = False
    carry_slip: float = 0.0

    def _pairs(self, held_out: bool) -> list[tuple[int, int]]:
        n = self.max_operand + 1
        return [
            (a, b)
            for a in range(n)
            for b in range(n)
            if _is_held_out(a, b, self.held_out_percent) == held_out
        ]

    def train_problem(self, seed: int, index: int) -> Problem:
        """The `index`-th training prompt of the stream `seed` (never a held-out pair)."""
        pairs = self._train_pairs
        rng = random.Random(f"{seed}:{index}")
        return Problem(*pairs[rng.randrange(len(pairs))], self.reverse, self.width)

    def demonstrations(self, count: int, seed: int) -> list[tuple[str, str]]:
        """`count` (prompt, completion) demonstrations on distinct training problems.

        The demonstrator is careless: at every carry it forgets the carry with probability
        `carry_slip`, so its answers are wrong on many problems that need a carry.
        """
        rng = random.Random(f"demos:{seed}")
        # one slip draw per column that can carry out; at least 4, the draws the quickstart's
        # demonstrations were made with (changing the count would change every demonstration)
        columns = max(4, len(str(self.max_operand)))
        demos = []
        for a, b in rng.sample(self._train_pairs, count):
            slips = tuple(rng.random() < self.carry_slip for _ in range(columns))
            problem = Problem(a, b, self.reverse, self.width)
            demos.append((problem.prompt, problem.written(slips)))
        return demos

    def answer_for(self, prompt: str) -> str:
        """The correct answer to a prompt `"a+b="` of this task."""
        return _answer_for(prompt, self.reverse, self.width)

    def held_out(self, count: int, seed: int = 0) -> list[Problem]:
        """`count` distinct held-out problems (evaluation only)."""
        rng = random.Random(f"held-out:{seed}")
        pairs = self._held_out_pairs
        if count > len(pairs):
            raise ValueError(f"only {len(pairs)} held-out pairs exist; asked for {count}")
        return [Problem(*p, self.reverse, self.width) for p in rng.sample(pairs, count)]

    @property
    def width(self) -> int:
        """Digits per operand in the reversed layout (0: numbers written as usual)."""
        return len(str(self.max_operand)) if self.reverse else 0

    @property
    def pool_size(self) -> int:
        """How many distinct training problems exist."""
        return len(self._train_pairs)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_train_pairs", self._pairs(held_out=False))
        object.__setattr__(self, "_held_out_pairs", self._pairs(held_out=True))


def _answer_for(prompt: str, reverse: bool, width: int) -> str:
    a, b = prompt.rstrip("=").split("+")
    return Problem(read_number(a, width), read_number(b, width), reverse, width).answer


_NO_CARRY = tuple((x, y) for x in range(10) for y in range(10) if x + y <= 8)  # 45 pairs
_CARRY = tuple((x, y) for x in range(10) for y in range(10) if x + y >= 10)  # 45 pairs


@dataclass(frozen=True)
class LongAdditionTask:
    """Addition of two `digits`-digit numbers with sparse carries (module docstring, "Long answers").

    Problems are drawn, never enumerated: `train_problem(seed, index)` is a pure function of its
    arguments and redraws (from the same seeded generator) while the pair is held out;
    `held_out(count, seed)` takes the first `count` distinct held-out pairs of a seeded stream, so
    `held_out(L, seed)` is a prefix of `held_out(N, seed)` for L <= N.
    """

    digits: int = 127
    carries: float = 1.0
    held_out_percent: int = 12
    reverse: bool = True
    carry_slip: float = 0.0

    def __post_init__(self) -> None:
        if self.digits < 1:
            raise ValueError(f"digits must be >= 1, got {self.digits}")
        if not 0 < self.carries <= self.digits:
            raise ValueError(f"carries must be in (0, digits={self.digits}], got {self.carries}")

    @property
    def width(self) -> int:
        """Digits per operand in the reversed layout (0: numbers written as usual)."""
        return self.digits if self.reverse else 0

    @property
    def prompt_length(self) -> int:
        """Tokens in a prompt `"a+b="`."""
        return 2 * self.digits + 2

    @property
    def answer_length(self) -> int:
        """Tokens in an answer: the sum has digits + 1 digits (zero-padded when reversed)."""
        return self.digits + 1

    @property
    def pool_size(self) -> int:
        """About how many distinct training problems exist: the pairs the column draw can give (45
        or 90 digit pairs per column), less the held-out slice. Never enumerated."""
        per_column = len(_CARRY) if self.carries == self.digits else len(_CARRY) + len(_NO_CARRY)
        return int(per_column ** self.digits * training_share(self.held_out_percent))

    def _draw(self, rng: random.Random) -> tuple[int, int]:
        """One pair, column by column: carry out with probability carries / digits, else a + b <= 8."""
        q = self.carries / self.digits
        a_digits, b_digits = [], []
        for _ in range(self.digits):
            x, y = rng.choice(_CARRY if rng.random() < q else _NO_CARRY)
            a_digits.append(x)
            b_digits.append(y)
        # column k is the k-th least significant digit
        return int("".join(map(str, reversed(a_digits)))), int("".join(map(str, reversed(b_digits))))

    def _draw_where(self, rng: random.Random, held_out: bool) -> tuple[int, int]:
        for _ in range(_DRAWS_PER_PROBLEM):
            a, b = self._draw(rng)
            if _is_held_out(a, b, self.held_out_percent) == held_out:
                return a, b
        side = "held-out" if held_out else "training"
        raise ValueError(f"no {side} pair in {_DRAWS_PER_PROBLEM} draws (held_out_percent={self.held_out_percent})")

    def _problem(self, a: int, b: int) -> Problem:
        return Problem(a, b, self.reverse, self.width)

    def train_problem(self, seed: int, index: int) -> Problem:
        """The `index`-th training prompt of the stream `seed` (never a held-out pair)."""
        return self._problem(*self._draw_where(random.Random(f"long:{seed}:{index}"), held_out=False))

    def demonstrations(self, count: int, seed: int) -> list[tuple[str, str]]:
        """`count` (prompt, completion) demonstrations on distinct training problems; the careless
        demonstrator forgets the carry out of every column with probability `carry_slip`."""
        rng = random.Random(f"long-demos:{seed}")
        demos = []
        for a, b in self._distinct_pairs(rng, count, held_out=False):
            problem = self._problem(a, b)
            slips = tuple(rng.random() < self.carry_slip for _ in range(self.digits))
            demos.append((problem.prompt, problem.written(slips)))
        return demos

    def answer_for(self, prompt: str) -> str:
        """The correct answer to a prompt `"a+b="` of this task."""
        return _answer_for(prompt, self.reverse, self.width)

    def held_out(self, count: int, seed: int = 0) -> list[Problem]:
        """`count` distinct held-out problems (evaluation only), a prefix of any longer list."""
        rng = random.Random(f"long-held-out:{seed}")
        return [self._problem(*pair) for pair in self._distinct_pairs(rng, count, held_out=True)]

    def _distinct_pairs(self, rng: random.Random, count: int, held_out: bool):
        """`count` distinct pairs of one side of the split, drawn from `rng`."""
        what = "held-out pairs" if held_out else "training problems"
        return distinct_draws(lambda: self._draw_where(rng, held_out), count, what)


def addition_task(max_operand: int = 99, held_out_percent: int = 15, reverse: bool = False,
                  carry_slip: float = 0.0, digits: int | None = None, carries: float = 1.0):
    """`AdditionTask` on `[0, max_operand]`, or with `digits` a `LongAdditionTask` (max_operand unused)."""
    if digits is None:
        return AdditionTask(max_operand, held_out_percent, reverse, carry_slip)
    return LongAdditionTask(digits, carries, held_out_percent, reverse, carry_slip)
