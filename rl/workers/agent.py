"""Multi-turn episodes in flight: the decode batcher, the episode loop and the agent's warm-start batches.

Every episode is a coroutine: it asks for its next action, hands it to the environment, and waits for the
observation (a tool call that may take a second). While it waits, the others go on: the ``DecodeBatcher``
gathers the generation requests of all episodes ready to act and decodes them in one engine call, on a
thread, so the event loop keeps serving the tools meanwhile. Weights may change between two calls: an
episode's actions then carry different policy versions (a partial rollout), each token keeping the version
and log-probability that produced it (``rl.envs.agent.Transcript``).

``ToolClock`` measures the environment's busy time (seconds with at least one tool call in flight) for the
run's idle ratios; the rollout worker times the decode calls.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from rl.envs.agent import Segment, Transcript
from rl.envs.chat import ByteTurns
from rl.envs.task import STOP
from rl.inference.decode import Completion

# one action per prompt (token ids), each up to a stop token; the keys name the episodes (an engine may keep
# their caches)
Decode = Callable[[list[list[int]], list[str]], list[Completion]]
BYTES = ByteTurns()


_episode_ids = itertools.count()


class DecodeBatcher:
    """Batches the pending decode requests of the episodes in flight into one ``decode`` call at a time."""

    def __init__(self, decode: Decode):
        self.decode = decode
        self._pending: list[tuple[list[int], str, asyncio.Future]] = []
        self._running: asyncio.Task | None = None

    async def generate(self, prompt: list[int], key: str) -> Completion:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((prompt, key, fut))
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(0)   # let the episodes that are ready this tick join the batch
            batch, self._pending = self._pending, []
            try:
                comps = await asyncio.to_thread(self.decode, [p for p, _, _ in batch], [k for _, k, _ in batch])
            except Exception as e:  # noqa: BLE001 - handed to every episode of the batch, which fail with it
                for _, _, fut in batch:
                    fut.set_exception(e)
                continue
            for (_, _, fut), c in zip(batch, comps):
                fut.set_result(c)


class ToolClock:
    """Seconds during which at least one tool call was in flight (the environment's busy time)."""

    def __init__(self):
        self.busy, self._in_flight, self._since = 0.0, 0, 0.0
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._in_flight == 0:
                self._since = time.perf_counter()
            self._in_flight += 1

    def stop(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.busy += time.perf_counter() - self._since


@dataclass
class EpisodeResult:
    transcript: Transcript
    reward: float
    recovered: bool
    """It made a policy error and still answered right."""


async def run_episode(env, episode, batcher: DecodeBatcher, max_new_tokens: int, max_len: int,
                      clock: ToolClock | None = None, turns=BYTES) -> EpisodeResult:
    """Act until the episode is done, or its context is full (then it ends as it stands). The transcript never
    exceeds ``max_len`` tokens. ``turns`` (``rl.envs.chat``) makes the environment's text into tokens and the
    actions' tokens into text: bytes, or chat messages."""
    segments = [Segment("prompt", list(turns.prompt(episode.prompt)))]
    context, key = list(segments[0].tokens), f"episode-{next(_episode_ids)}"
    while not episode.done and len(context) + max_new_tokens <= max_len:
        comp = await batcher.generate(context, key)
        action = Segment("action", list(comp.tokens), list(comp.logp_infer), comp.version, comp.map_version)
        segments.append(action)
        context = context + comp.tokens
        if clock is not None:
            clock.start()
        try:
            obs = await env.step(episode, turns.action_text(comp.tokens))
        finally:
            if clock is not None:
                clock.stop()
        action.error = obs.error
        seen = turns.observation(obs.tokens) if obs.tokens else []
        if len(context) + len(seen) > max_len:
            break   # the context is full: the episode ends as it stands (unanswered)
        if seen:
            segments.append(Segment("observation", seen))
            context = context + seen
    transcript = Transcript(segments)
    reward = env.score(episode)
    return EpisodeResult(transcript, reward, recovered=transcript.policy_errors > 0 and reward == 1.0)


async def run_group(env, rng: random.Random, size: int, batcher: DecodeBatcher, max_new_tokens: int,
                    max_len: int, clock: ToolClock | None = None, turns=BYTES) -> tuple[object, list[EpisodeResult]]:
    """A GRPO group: ``size`` episodes of one problem (copies of a fresh episode), all in flight together."""
    first = await env.reset(rng)
    episodes = [first] + [copy.deepcopy(first) for _ in range(size - 1)]
    results = await asyncio.gather(*(run_episode(env, e, batcher, max_new_tokens, max_len, clock, turns)
                                     for e in episodes))
    return first, list(results)


def as_completion(result: EpisodeResult, error_masking: bool) -> Completion:
    """An episode as the trainer's sample: everything after the prompt, with its loss mask (observations and,
    under error masking, the policy's failed calls excluded) and the per-token versions."""
    t = result.transcript
    n_prompt = len(t.segments[0].tokens)
    return Completion(tuple(t.segments[0].tokens), t.tokens[n_prompt:], t.logp_infer()[n_prompt:],
                      t.oldest_version, stopped=True, map_version=t.oldest_map_version,
                      mask=t.loss_mask(error_masking)[n_prompt:], token_versions=t.versions()[n_prompt:])


def evaluate(env, problems: list, decode: Decode, max_new_tokens: int, max_len: int, turns=BYTES
             ) -> tuple[float, dict]:
    """Mean reward of ``problems`` (fresh episodes) under ``decode`` (greedy, the trainer's policy), all in
    flight together; with the share solved exactly, the policy's errors per episode and the share of episodes
    that recovered from one."""
    async def all_episodes():
        batcher = DecodeBatcher(decode)
        return await asyncio.gather(*(run_episode(env, copy.deepcopy(p), batcher, max_new_tokens, max_len,
                                                  turns=turns) for p in problems))
    results = asyncio.run(all_episodes())
    n = len(results)
    return sum(r.reward for r in results) / n, {"solved": sum(r.reward == 1.0 for r in results) / n,
                                                "policy_errors": sum(r.transcript.policy_errors for r in results) / n,
                                                "recovered": sum(r.recovered for r in results) / n}


def warm_start_batches(env, batch_size: int, error_masking: bool, seed: int, turns=BYTES):
    """``supervised_warm_start`` batches of the env's demonstrations: correct transcripts of its training problems
    (``env.demonstration(episode, rng)``), some with an error and its recovery, in ``turns``' tokens."""
    errors = random.Random(seed)   # which demonstrations hold an error: apart from the problems' stream
    return lambda rng: transcript_batch([tokenized(env.demonstration(env.sample(rng), errors), turns)
                                         for _ in range(batch_size)], error_masking)


def tokenized(transcript: Transcript, turns) -> Transcript:
    """A demonstration written in the environment's bytes (each action with its stop byte) as ``turns`` would
    produce it turn by turn: the same segments, errors kept, in the policy's tokens."""
    def one(s: Segment) -> Segment:
        text = bytes(s.tokens)
        tokens = {"prompt": turns.prompt, "observation": turns.observation,
                  "action": lambda t: turns.action(t.removesuffix(bytes([STOP])))}[s.kind](text)
        return Segment(s.kind, list(tokens), error=s.error)
    return Transcript([one(s) for s in transcript.segments])


def transcript_batch(transcripts: list[Transcript], error_masking: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[n, longest]`` and the loss mask of the next-token targets ``[n, longest - 1]``."""
    width = max(len(t.tokens) for t in transcripts)
    tokens = torch.zeros(len(transcripts), width, dtype=torch.long)
    mask = torch.zeros(len(transcripts), width - 1)
    for i, t in enumerate(transcripts):
        toks, m = t.tokens, t.loss_mask(error_masking)
        tokens[i, :len(toks)] = torch.tensor(toks)
        mask[i, :len(toks) - 1] = torch.tensor(m[1:], dtype=torch.float32)   # target t+1 trained if its mask says
    return tokens, mask
