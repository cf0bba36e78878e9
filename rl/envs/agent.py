"""Multi-turn environments: the interface an agent task implements, and the transcripts its episodes make.

An episode alternates the policy's *actions* (generated tokens ending in a stop token) with the
environment's *observations* (a tool's answer, or an error). The environment speaks text (bytes); how its
text and the actions' tokens convert is the policy's tokenizer's business (``rl.envs.chat``: bytes as tokens,
or chat messages). The interface is asynchronous because tools
take time: while one episode waits on its tool, the others decode.

    episode = await env.reset(rng)              # the prompt is episode.prompt
    obs = await env.step(episode, action)       # an observation; episode.done once the policy answered
    reward = env.score(episode)                 # in [0, 1], once done

A transcript keeps each segment with its origin, so the loss can tell what to train:

* ``prompt`` and ``observation`` tokens are never trained (the policy did not choose them);
* ``action`` tokens are trained, each with the log-probability and the policy version that produced it
  (an episode may span weight versions: a partial rollout);
* under error masking (GLM-5, ``rl.error_masking``) an action whose tool call failed through the policy's
  own fault (``POLICY_ERRORS``: a malformed call, wrong arguments) is not trained either, while the later
  actions that recover are: the model learns the recovery, not the error. Failures of the world (the
  service unavailable, a timeout) are not the policy's fault and mask nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal, Protocol

SegmentKind = Literal["prompt", "action", "observation"]
ErrorKind = Literal["malformed", "wrong_arguments", "unavailable", "timeout"]
POLICY_ERRORS: frozenset[str] = frozenset({"malformed", "wrong_arguments"})   # the policy's own fault


@dataclass
class Segment:
    kind: SegmentKind
    tokens: list[int]
    logp: list[float] = field(default_factory=list)
    """Actions: log pi_infer of each token."""
    version: int = -1
    """Actions: the policy version that generated them."""
    map_version: int = 0
    """Actions: the precision-map version the rollout engine held."""
    error: ErrorKind | None = None
    """Actions: how the tool call it made failed (None: it did not, or it made none)."""


@dataclass
class Transcript:
    segments: list[Segment]

    @property
    def tokens(self) -> list[int]:
        return [t for s in self.segments for t in s.tokens]

    def loss_mask(self, error_masking: bool) -> list[int]:
        """Per token: 1 where the loss trains it. Prompt and observation tokens never; action tokens unless
        ``error_masking`` and the action's call failed through the policy's fault."""
        out: list[int] = []
        for s in self.segments:
            trained = s.kind == "action" and not (error_masking and s.error in POLICY_ERRORS)
            out += [int(trained)] * len(s.tokens)
        return out

    def logp_infer(self) -> list[float]:
        """Per token: log pi_infer of action tokens, 0 elsewhere."""
        return [x for s in self.segments for x in (s.logp if s.kind == "action" else [0.0] * len(s.tokens))]

    def versions(self) -> list[int]:
        """Per token: the policy version of action tokens, -1 elsewhere."""
        return [s.version if s.kind == "action" else -1 for s in self.segments for _ in s.tokens]

    @property
    def oldest_version(self) -> int:
        """An episode is as stale as its oldest action."""
        return min((s.version for s in self.segments if s.kind == "action"), default=-1)

    @property
    def oldest_map_version(self) -> int:
        return min((s.map_version for s in self.segments if s.kind == "action"), default=0)

    @property
    def policy_errors(self) -> int:
        return sum(s.kind == "action" and s.error in POLICY_ERRORS for s in self.segments)


@dataclass
class Observation:
    tokens: bytes
    error: ErrorKind | None = None
    """The error that the action this answers caused (None: the call succeeded, or no call was made)."""


class Episode(Protocol):
    prompt: bytes
    done: bool


class MultiTurnEnv(Protocol):
    name: str
    max_turns: int
    """Actions per episode; an episode that has not answered by then ends unanswered."""

    async def reset(self, rng: random.Random) -> Episode:
        """A new episode (a training problem)."""

    async def step(self, episode: Episode, action: bytes) -> Observation:
        """Act (the action's text, stop excluded); returns what the environment answers. Sets
        ``episode.done`` when the episode is over (the policy answered)."""

    def score(self, episode: Episode) -> float:
        """The reward in [0, 1] of a finished (or cut off) episode."""

    def sample(self, rng: random.Random) -> Episode:
        """For the supervised warm start: a training problem (``reset`` without waiting)."""

    def demonstration(self, episode: Episode, rng: random.Random) -> Transcript:
        """For the supervised warm start: a correct transcript of ``episode``, possibly with an error and its
        recovery (mark the erring action's ``error``, so error masking can leave it untrained)."""
