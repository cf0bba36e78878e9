"""What every single-turn task shares: the problem type, the ``[task]`` table and the choice of task.

A task turns problems into prompts (bytes here; chat-template token ids through ``rl.envs.chat``), scores
completions in [0, 1], keeps a held-out set disjoint from what training samples, and formats correct answers
for the supervised warm start.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated, Literal, Protocol

from precisionrt.config import Checked, Range, Seed
from precisionrt.models.tokenizer import BYTE_STOP as STOP   # the stop byte every completion ends with


@dataclass(frozen=True)
class Problem:
    prompt: bytes | tuple[int, ...]   # the prompt's tokens: its bytes, or token ids (``rl.envs.chat``)
    target: bytes   # the correct answer's text, stop excluded


@dataclass
class TaskConfig(Checked):
    """The ``[task]`` table."""

    name: Literal["reverse_digits", "addition", "calculator"] = "reverse_digits"
    """``reverse_digits``: reverse a digit string (learnt in about a minute on a CPU); ``addition``: add two
    numbers, the sum written least significant digit first (carries make it take several minutes);
    ``calculator``: the multi-turn tool task (``rl/envs/calculator.py``, configured by ``[env]``)."""
    min_digits: Annotated[int, Range(ge=1, le=18)] = 3
    """Digits of the string to reverse, or of each operand."""
    max_digits: Annotated[int, Range(ge=1, le=18)] = 5
    heldout_size: Annotated[int, Range(ge=1, le=10**6)] = 128
    seed: Seed = 1234
    """Draws the held-out set."""
    demonstrator_drops_carry: Annotated[float, Range(ge=0, le=1)] = 0.0
    """Addition only: the share of carries that the supervised warm start's demonstrator forgets, each carry
    independently (``472+391=``: ``368``, the sum 863 reversed, or ``367`` with the carry into the hundreds
    forgotten). 0: every demonstration is correct; 1: it never carries (``367``; a systematic mistake
    that leaves RL nothing to sample, README "Main job"). Rewards and the held-out figure always score
    against the correct sum."""

    def validate(self) -> None:
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits ({self.min_digits}) must be <= max_digits ({self.max_digits})")
        if self.demonstrator_drops_carry and self.name != "addition":
            raise ValueError(f"demonstrator_drops_carry: only addition has carries; task.name is {self.name!r}")
        if self.heldout_size > self.distinct_problems() // 2:   # held-out problems are drawn until distinct:
            raise ValueError(                                     # more would hang, and training needs the rest
                f"heldout_size {self.heldout_size} needs more than half of the {self.distinct_problems()} distinct "
                f"problems of {self.min_digits}-{self.max_digits} digits; lower task.heldout_size or widen the "
                "digit range")

    def distinct_problems(self) -> int:
        strings = sum(10**n for n in range(self.min_digits, self.max_digits + 1))
        if self.name == "reverse_digits":
            return strings
        numbers = sum(10 if n == 1 else 9 * 10 ** (n - 1) for n in range(self.min_digits, self.max_digits + 1))
        return numbers * numbers


class Task(Protocol):
    name: str
    max_prompt_tokens: int
    max_completion_tokens: int   # the answer budget, stop token included
    stop_ids: tuple[int, ...]    # the tokens that end a completion

    def decode(self, tokens: list[int]) -> bytes:
        """The answer text of a completion's tokens, stop excluded."""

    def heldout(self) -> list[Problem]: ...

    def sample(self, rng: random.Random) -> Problem:
        """A training problem, never one of the held-out set."""

    def reward(self, problem: Problem, completion: bytes) -> float:
        """In [0, 1]; ``completion`` is what the model generated, stop byte excluded."""

    def demonstration(self, problem: Problem, rng: random.Random) -> bytes:
        """The supervised warm start's answer to ``problem``: its target, unless the task's demonstrator makes
        mistakes (``task.demonstrator_drops_carry``; ``rng`` draws them). Rewards score against the target."""


def partial_credit(answer: bytes, target: bytes) -> float:
    """The fraction of target positions whose byte is right, over ``max(len(target), len(answer))`` so that
    padding an answer with extra bytes costs credit."""
    return sum(a == t for a, t in zip(answer, target)) / max(len(target), len(answer))


class HeldOutTask:
    """A task over problems drawn by ``draw``: a fixed held-out set, and training samples outside it."""

    name = "task"
    stop_ids = (STOP,)

    def __init__(self, config: TaskConfig):
        self.config = config
        rng = random.Random(config.seed)
        held: set[Problem] = set()
        while len(held) < config.heldout_size:
            held.add(self.draw(rng))
        self._heldout = sorted(held, key=lambda p: p.prompt)
        self._held = frozenset(held)

    def draw(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def heldout(self) -> list[Problem]:
        return list(self._heldout)

    def sample(self, rng: random.Random) -> Problem:
        while True:
            p = self.draw(rng)
            if p not in self._held:
                return p

    def decode(self, tokens: list[int]) -> bytes:
        return bytes(t for t in tokens if t != STOP)

    def reward(self, problem: Problem, completion: bytes) -> float:
        return partial_credit(completion, problem.target)

    def demonstration(self, problem: Problem, rng: random.Random) -> bytes:
        return problem.target

    def format_example(self, problem: Problem, answer: bytes) -> tuple[bytes, bytes]:
        return problem.prompt, answer + bytes([STOP])
