"""Add two numbers: a single-turn task with carries, which takes a tiny byte-level model minutes, not seconds.

Prompt ``"472+39="``, target ``"115"`` (511 written least significant digit first) and the stop byte. The sum
is written reversed because that is the order in which carries are computed: each digit then depends on the
addends' digits at its position and the carry from the digit just written (Lee et al., "Teaching Arithmetic
to Small Transformers", 2023, find reversed output makes addition learnable by small models). Each addend
has ``min_digits``-``max_digits`` digits, no leading zeros. Reward with partial credit per digit.

The warm start's demonstrations are the targets, or (``task.demonstrator_drops_carry`` > 0) the answers of a
pupil who forgets carries: each carry is dropped with that probability (``472+391=`` -> ``367`` when the carry
into the hundreds is forgotten, ``368`` when it is not). A policy that never carries scores 0.61 on the
three-digit held-out set (partial credit; 0.17 of its answers are right, those without a carry).
"""

from __future__ import annotations

import random

from rl.envs.task import HeldOutTask, Problem, TaskConfig


def written_sum(a: int, b: int, keep_carry) -> bytes:
    """``a + b`` written least significant digit first, column by column, by a pupil who carries a column's
    carry only when ``keep_carry()`` says so (``lambda: True``: the correct sum)."""
    digits, carry = [], 0
    while a or b or carry:
        column = a % 10 + b % 10 + carry
        digits.append(str(column % 10))
        carry = int(column >= 10 and keep_carry())
        a, b = a // 10, b // 10
    return "".join(digits).encode() or b"0"


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

    def demonstration(self, problem: Problem, rng: random.Random) -> bytes:
        drop = self.config.demonstrator_drops_carry
        if not drop:
            return problem.target
        a, b = problem.prompt.decode().removesuffix("=").split("+")
        return written_sum(int(a), int(b), lambda: rng.random() >= drop)
