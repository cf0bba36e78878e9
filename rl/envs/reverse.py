"""Reverse a short digit string: a verifiable single-turn task a tiny byte-level model learns on CPU.

Prompt ``"4821>"``, target completion ``"1284"`` followed by the stop byte ``"\\n"``. Reward with partial
credit (``rl.envs.task.partial_credit``). A held-out set of problems, disjoint from what training samples,
measures progress.
"""

from __future__ import annotations

import random

from rl.envs.task import HeldOutTask, Problem, TaskConfig

SEP = ">"


class ReverseDigits(HeldOutTask):
    name = "reverse_digits"

    def __init__(self, config: TaskConfig):
        self.max_prompt_tokens = config.max_digits + 1
        self.max_completion_tokens = config.max_digits + 1   # digits + stop
        super().__init__(config)

    def draw(self, rng: random.Random) -> Problem:
        n = rng.randint(self.config.min_digits, self.config.max_digits)
        digits = "".join(rng.choice("0123456789") for _ in range(n))
        return Problem(f"{digits}{SEP}".encode(), digits[::-1].encode())
