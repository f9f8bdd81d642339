"""Two-operand addition, `"a+b="` -> `"c"`: a verifiable task small enough to learn on a CPU.

Prompts are a pure function of `(seed, index)`, so a stream of prompts can be resumed at any index
without repeating or skipping one. Held-out prompts are the pairs whose hash falls into a fixed
slice of the space; training prompts and demonstrations never use them. The checker,
`score_answer` and the reward `exact_match_reward`, lives in `rewards.arithmetic` and is
re-exported here.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from rewards.arithmetic import exact_match_reward, score_answer

__all__ = ["AdditionTask", "Problem", "written_sum", "score_answer", "exact_match_reward"]


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    reverse: bool = False

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return written_sum(self.a, self.b, self.reverse, slips=())


def written_sum(a: int, b: int, reverse: bool, slips: tuple[bool, ...] = ()) -> str:
    """Column addition, digit by digit from the right; `slips[k]` drops the carry out of column k.

    With `reverse` the digits are written least significant first, the order column addition
    produces them in (and the order that lets a small transformer learn the carry rule quickly).
    """
    digits, carry, column = [], 0, 0
    while a or b or carry:
        total = a % 10 + b % 10 + carry
        digits.append(total % 10)
        carry = total // 10
        if carry and column < len(slips) and slips[column]:
            carry = 0
        a, b, column = a // 10, b // 10, column + 1
    text = "".join(map(str, digits or [0]))
    return text if reverse else text[::-1]


def _is_held_out(a: int, b: int, held_out_percent: int) -> bool:
    digest = hashlib.sha256(f"{a}+{b}".encode()).digest()
    return digest[0] * 100 // 256 < held_out_percent


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
        return Problem(*pairs[rng.randrange(len(pairs))], self.reverse)

    def demonstrations(self, count: int, seed: int) -> list[tuple[str, str]]:
        """`count` (prompt, completion) demonstrations on distinct training problems.

        The demonstrator is careless: at every carry it forgets the carry with probability
        `carry_slip`, so its answers are wrong on many problems that need a carry.
        """
        rng = random.Random(f"demos:{seed}")
        demos = []
        for a, b in rng.sample(self._train_pairs, count):
            slips = tuple(rng.random() < self.carry_slip for _ in range(4))
            demos.append((f"{a}+{b}=", written_sum(a, b, self.reverse, slips)))
        return demos

    def answer_for(self, prompt: str) -> str:
        """The correct answer to a prompt `"a+b="` of this task."""
        a, b = prompt.rstrip("=").split("+")
        return Problem(int(a), int(b), self.reverse).answer

    def held_out(self, count: int, seed: int = 0) -> list[Problem]:
        """`count` distinct held-out problems (evaluation only)."""
        rng = random.Random(f"held-out:{seed}")
        pairs = self._held_out_pairs
        if count > len(pairs):
            raise ValueError(f"only {len(pairs)} held-out pairs exist; asked for {count}")
        return [Problem(*p, self.reverse) for p in rng.sample(pairs, count)]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_train_pairs", self._pairs(held_out=False))
        object.__setattr__(self, "_held_out_pairs", self._pairs(held_out=True))
