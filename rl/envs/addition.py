"""Add two numbers: a single-turn task with carries, which takes a tiny byte-level model minutes, not seconds.

Prompt ``"472+39="``, target ``"115"`` (511 written least significant digit first) and the stop byte. The sum
is written reversed because that is the order in which carries are computed: each digit then depends on the
addends' digits at its position and the carry from the digit just written (Lee et al., "Teaching Arithmetic
to Small Transformers", 2023, find reversed output makes addition learnable by small models). Each addend
has ``min_digits``-``max_digits`` digits, no leading zeros. Reward with partial credit per digit.
"""

from __future__ import annotations

import random

from rl.envs.task import HeldOutTask, Problem, TaskConfig


class Addition(HeldOutTask):
    name = "addition"

    def __init__(self, config: TaskConfig):
        self.max_prompt_tokens = 2 * config.max_digits + 2       # a + b =
        self.max_completion_tokens = config.max_digits + 2       # the sum's digits (one more than an addend) + stop
        super().__init__(config)

    def _number(self, rng: random.Random) -> int:
        n = rng.randint(self.config.min_digits, self.config.max_digits)
        return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)

    def draw(self, rng: random.Random) -> Problem:
        a, b = self._number(rng), self._number(rng)
        return Problem(f"{a}+{b}=".encode(), str(a + b)[::-1].encode())
