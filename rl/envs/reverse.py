"""Reverse a short digit string: a verifiable single-turn task a tiny byte-level model learns on CPU.

Prompt ``"4821>"``, target completion ``"1284"`` followed by the stop byte ``"\\n"``. Reward with partial
credit: the fraction of target positions whose digit is right, divided by ``max(len(target), len(answer))``
so that padding an answer with extra digits costs credit. A held-out set of problems, disjoint from what
training samples, measures progress.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

STOP = ord("\n")
SEP = ">"


@dataclass(frozen=True)
class Problem:
    digits: str

    @property
    def prompt(self) -> bytes:
        return f"{self.digits}{SEP}".encode()

    @property
    def target(self) -> bytes:
        return self.digits[::-1].encode()


@dataclass
class ReverseTaskConfig:
    min_digits: int = 3
    max_digits: int = 5
    heldout_size: int = 128
    seed: int = 1234

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if self.heldout_size < 1:
            raise ValueError("heldout_size must be >= 1")
        if self.max_digits > 18:
            raise ValueError(f"max_digits must be <= 18 (the answer must fit the context), got {self.max_digits}")
        distinct = sum(10**n for n in range(self.min_digits, self.max_digits + 1))
        if self.heldout_size > distinct // 2:   # held-out problems are drawn until distinct: more would hang,
            raise ValueError(                    # and training needs the rest
                f"heldout_size {self.heldout_size} needs more than half of the {distinct} distinct problems of "
                f"{self.min_digits}-{self.max_digits} digits; lower task.heldout_size or widen the digit range")


class ReverseDigits:
    name = "reverse_digits"

    def __init__(self, config: ReverseTaskConfig):
        self.config = config
        rng = random.Random(config.seed)
        held: set[str] = set()
        while len(held) < config.heldout_size:
            held.add(self._random_digits(rng))
        self._heldout = sorted(held)

    def _random_digits(self, rng: random.Random) -> str:
        n = rng.randint(self.config.min_digits, self.config.max_digits)
        return "".join(rng.choice("0123456789") for _ in range(n))

    @property
    def max_completion_tokens(self) -> int:
        return self.config.max_digits + 1   # digits + stop

    def heldout(self) -> list[Problem]:
        return [Problem(d) for d in self._heldout]

    def sample(self, rng: random.Random) -> Problem:
        """A training problem, never one of the held-out set."""
        held = set(self._heldout)
        while True:
            d = self._random_digits(rng)
            if d not in held:
                return Problem(d)

    def reward(self, problem: Problem, completion: bytes) -> float:
        """Partial credit in [0, 1]; ``completion`` is what the model generated, stop byte excluded."""
        answer, target = completion, problem.target
        right = sum(a == t for a, t in zip(answer, target))
        return right / max(len(target), len(answer))

    def format_example(self, problem: Problem, answer: bytes) -> tuple[bytes, bytes]:
        """(prompt, completion with stop byte) for supervised warm starts."""
        return problem.prompt, answer + bytes([STOP])
