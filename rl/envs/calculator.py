"""Arithmetic with a calculator tool: the built-in multi-turn task (``rl/envs/agent.py``'s interface).

A line protocol, one line per turn (the lines are the tokens of a byte-level model; under a real tokenizer
each is the content of a chat message, ``rl.envs.chat.ChatTurns``)::

    Q:4821*367          the prompt: 3-4 digit operands, + or *
    C:4821*367          the policy calls the calculator with the question's expression
    R:1769307           the tool's answer after a delay (or E:service unavailable, E:timeout)
    A:1769307           the policy answers: the episode ends

A tiny byte-level model cannot multiply 4-digit numbers, but it can learn to copy the question into a call and
the result into an answer: the tool is what solves the task. The tool answers after a delay drawn from a
log-normal distribution (median ``delay_median``, spread ``delay_sigma``: by default 0.1 s median and a p99
of 1.0 s, the long tail of a real service), fails at ``failure_rate`` (``E:service unavailable``), hangs at
``hang_rate`` and is cut at ``timeout`` (``E:timeout``). A line that is neither a call nor an answer gets
``E:malformed call``; a call with other operands than the question's gets ``E:wrong arguments``. Both are
the policy's fault (masked under error masking); the policy can recover by calling again.

Reward: partial credit on the answer's digits (``rl.envs.task.partial_credit``); 0 without an answer by
``max_turns`` actions.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
from dataclasses import dataclass, field
from typing import Annotated

from precisionrt.config import Checked, Fraction, Range, Text

from rl.envs.agent import ErrorKind, Observation, Segment, Transcript
from rl.envs.task import STOP, TaskConfig, partial_credit

_CALL = re.compile(rb"C:(\d{1,12})([+*])(\d{1,12})")
_ANSWER = re.compile(rb"A:(\d{1,24})")


@dataclass
class ToolConfig(Checked):
    """The ``[env.tool]`` table: how the calculator service behaves (times in seconds)."""

    delay_median: Annotated[float, Range(ge=0, le=3600)] = 0.1
    delay_sigma: Annotated[float, Range(ge=0, le=10)] = 1.0
    """Log-normal spread of the delay: p99 = median * exp(2.33 sigma) (1.0 s with the defaults)."""
    failure_rate: Fraction = 0.05
    """Share of calls answered ``E:service unavailable`` (after the delay)."""
    hang_rate: Fraction = 0.01
    """Share of calls that never answer: cut at ``timeout``."""
    timeout: Annotated[float, Range(gt=0, le=3600)] = 2.0


    def draw_delay(self, rng: random.Random) -> float:
        return self.delay_median * math.exp(self.delay_sigma * rng.gauss(0.0, 1.0))


@dataclass
class EnvConfig(Checked):
    """The ``[env]`` table of multi-turn runs (``task.name = "calculator"``; the operands' digits, the held-out
    set and its seed come from ``[task]``)."""

    operators: Annotated[str, Text("a non-empty string of the operators '+' and '*'", pattern=r'[+*]+')] = "+*"
    max_turns: Annotated[int, Range(ge=2, le=1000)] = 4
    """Actions per episode: an episode without an answer by then ends with reward 0."""
    max_action_tokens: Annotated[int, Range(ge=4, le=2**16)] = 24
    """The decode budget of one action (a call or an answer, stop byte included)."""
    tool: ToolConfig = field(default_factory=ToolConfig)



@dataclass
class CalcEpisode:
    a: int
    op: str
    b: int
    turns: int = 0
    done: bool = False
    answer: bytes | None = None
    errors: dict = field(default_factory=dict)   # error kind -> count
    tool_wait: float = 0.0   # seconds this episode waited on the tool

    @property
    def prompt(self) -> bytes:
        return f"Q:{self.a}{self.op}{self.b}\n".encode()

    @property
    def result(self) -> int:
        return self.a + self.b if self.op == "+" else self.a * self.b


class CalculatorTool:
    """The service: the right value, late, sometimes not at all."""

    def __init__(self, config: ToolConfig, rng: random.Random):
        self.config, self.rng = config, rng

    async def __call__(self, a: int, op: str, b: int) -> tuple[bytes, ErrorKind | None]:
        c = self.config
        hang, fail, delay = self.rng.random() < c.hang_rate, self.rng.random() < c.failure_rate, c.draw_delay(self.rng)
        await asyncio.sleep(math.inf if hang else delay)   # asyncio.sleep(inf) waits until cancelled
        if fail:
            return b"E:service unavailable\n", "unavailable"
        return f"R:{a + b if op == '+' else a * b}\n".encode(), None


class CalculatorEnv:
    name = "calculator"

    def __init__(self, task: TaskConfig, config: EnvConfig, tool_seed: int = 0):
        if not task.max_digits <= 12:
            raise ValueError(f"task.max_digits must be <= 12 for the calculator, got {task.max_digits}")
        self.task, self.config, self.max_turns = task, config, config.max_turns
        self.tool = CalculatorTool(config.tool, random.Random(tool_seed))
        rng, held = random.Random(task.seed), set()
        while len(held) < task.heldout_size:
            held.add(self._draw(rng))
        self._held = frozenset(held)
        self._heldout = sorted(held)
        # calls that reached the tool and ended (answered, failed or cut at the timeout), and errors by kind
        self.stats = {"calls": 0, "timeout": 0, "unavailable": 0, "malformed": 0, "wrong_arguments": 0}

    def _number(self, rng: random.Random) -> int:
        n = rng.randint(self.task.min_digits, self.task.max_digits)
        return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        return self._number(rng), rng.choice(self.config.operators), self._number(rng)

    @property
    def max_prompt_tokens(self) -> int:
        return 2 * self.task.max_digits + 4   # Q:a*b and the stop byte

    def heldout(self) -> list[CalcEpisode]:
        return [CalcEpisode(*q) for q in self._heldout]

    def sample(self, rng: random.Random) -> CalcEpisode:
        """A training problem, never one of the held-out set."""
        while (q := self._draw(rng)) in self._held:
            pass
        return CalcEpisode(*q)

    async def reset(self, rng: random.Random) -> CalcEpisode:
        return self.sample(rng)

    async def step(self, episode: CalcEpisode, action: bytes) -> Observation:
        if episode.done:
            raise ValueError("step on a finished episode")
        episode.turns += 1
        if m := _ANSWER.fullmatch(action):
            episode.answer, episode.done = m.group(1), True
            return Observation(b"")
        obs = await self._call(episode, action)
        if obs.error is not None:
            episode.errors[obs.error] = episode.errors.get(obs.error, 0) + 1
            self.stats[obs.error] += 1
        if episode.turns >= self.max_turns:
            episode.done = True   # out of turns, unanswered
        return obs

    async def _call(self, episode: CalcEpisode, action: bytes) -> Observation:
        m = _CALL.fullmatch(action)
        if m is None:
            return Observation(b"E:malformed call\n", "malformed")
        a, op, b = int(m.group(1)), m.group(2).decode(), int(m.group(3))
        if (a, op, b) != (episode.a, episode.op, episode.b):
            return Observation(b"E:wrong arguments\n", "wrong_arguments")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            text, error = await asyncio.wait_for(self.tool(a, op, b), self.config.tool.timeout)
        except asyncio.TimeoutError:
            text, error = b"E:timeout\n", "timeout"
        finally:
            episode.tool_wait += loop.time() - t0
        self.stats["calls"] += 1   # answered or cut: a call cancelled with its episode (the run stopping) is not
        return Observation(text, error)

    def demonstration(self, episode: CalcEpisode, rng: random.Random, policy_error_rate: float = 0.3,
                      service_error_rate: float = 0.2) -> Transcript:
        """A correct transcript for the supervised warm start. Some open with an error an agent makes and
        recovers from: a malformed call or one with wrong operands (the policy's own errors, masked under error
        masking), or a call the service failed (retried; never masked)."""
        a, op, b = episode.a, episode.op, episode.b
        call = f"C:{a}{op}{b}\n".encode()
        segs = [Segment("prompt", list(episode.prompt))]
        if rng.random() < policy_error_rate:
            if rng.random() < 0.5:
                segs += [Segment("action", list(call.replace(b":", b"", 1)), error="malformed"),
                         Segment("observation", list(b"E:malformed call\n"))]
            else:
                segs += [Segment("action", list(f"C:{b}{op}{a + 1}\n".encode()), error="wrong_arguments"),
                         Segment("observation", list(b"E:wrong arguments\n"))]
        elif rng.random() < service_error_rate:
            segs += [Segment("action", list(call), error="unavailable"),
                     Segment("observation", list(b"E:service unavailable\n"))]
        segs += [Segment("action", list(call)), Segment("observation", list(f"R:{episode.result}\n".encode())),
                 Segment("action", list(f"A:{episode.result}".encode()) + [STOP])]
        return Transcript(segs)

    def score(self, episode: CalcEpisode) -> float:
        if episode.answer is None:
            return 0.0
        return partial_credit(episode.answer, str(episode.result).encode())
