"""Bounded staleness for asynchronous RL: policy versions, admission control, drop rules, accounting.

A sample's staleness is ``trainer_version_at_consumption - version_that_generated_it``. With bound eta
(``max_staleness``; 0 is on-policy):

* admission control (AReaL's rule): a new rollout may start only while
  ``accepted + running < (eta + version + 1) * batch_size``: the trainer cannot possibly consume more than that
  before its version moves past what the sample could tolerate, so rollouts beyond it could only arrive stale;
* a sample that still arrives with staleness > eta is dropped with reason ``stale``;
* accounting: each sample is counted where it really happens: ``generated`` when its completion exists,
  ``trained`` or ``dropped[reason]`` where that happens. At the end of a run the samples still in flight are
  counted *physically* (what is left in the queue) and ``generated == trained + dropped + present`` is
  checked: a sample lost anywhere breaks it. Admissions whose generation failed produced no sample; they are
  counted apart (``failed_rollouts``; ``worker_lost`` those that died with a rollout worker).

The controller is thread-safe: rollout workers and the trainer share it.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated

from precisionrt.config import Checked, Range


@dataclass
class StalenessConfig(Checked):
    max_staleness: Annotated[int, Range(ge=0, le=10**6)] = 2



@dataclass
class Accounting:
    generated: int = 0
    """Samples whose completion exists."""
    trained: int = 0
    dropped: Counter = field(default_factory=Counter)
    staleness_trained: Counter = field(default_factory=Counter)
    failed_rollouts: int = 0
    """Admitted samples whose generation failed: no sample exists."""
    worker_lost: int = 0
    """Of those, lost with a rollout worker that died while holding them."""

    @property
    def in_flight(self) -> int:
        """Generated samples neither trained nor dropped, by the counters (``check`` counts them physically)."""
        return self.generated - self.trained - sum(self.dropped.values())

    def as_dict(self) -> dict:
        return {"generated": self.generated, "trained": self.trained, "dropped": dict(self.dropped),
                "in_flight": self.in_flight, "failed_rollouts": self.failed_rollouts,
                "worker_lost": self.worker_lost}


class StalenessController:
    """Tracks versions and sample counts; decides admission and staleness drops."""

    def __init__(self, config: StalenessConfig, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config
        self.batch_size = batch_size
        self.version = 0
        self.accepted = 0       # samples admitted (started) so far, less those dropped
        self.running = 0        # started, not yet returned
        self.acct = Accounting()
        self._lock = threading.Lock()

    @property
    def lock(self) -> threading.Lock:
        """Held by every counter update: hold it to read the counters consistently."""
        return self._lock

    def try_admit(self, n: int) -> bool:
        """Reserve ``n`` rollouts if admission control allows it (never partially)."""
        with self._lock:
            limit = (self.config.max_staleness + self.version + 1) * self.batch_size
            if self.accepted + n > limit:
                return False
            self.accepted += n
            self.running += n
            return True

    def returned(self, n: int) -> None:
        """``n`` admitted rollouts finished generating, or failed to."""
        with self._lock:
            self.running -= n

    def created(self, n: int) -> None:
        """``n`` samples now exist (their completions were generated): in flight until trained or dropped."""
        with self._lock:
            self.acct.generated += n

    def failed(self, n: int, worker_lost: bool = False) -> None:
        """``n`` admitted rollouts produced no sample: their admission slots are free again. ``worker_lost``:
        they were in flight in a rollout worker that died."""
        with self._lock:
            self.acct.failed_rollouts += n
            self.acct.worker_lost += n if worker_lost else 0
            self.accepted -= n

    def staleness(self, sample_version: int) -> int:
        return self.version - sample_version

    def is_stale(self, sample_version: int) -> bool:
        return self.staleness(sample_version) > self.config.max_staleness

    def drop(self, n: int, reason: str) -> None:
        """``n`` samples will never train: count them and free their admission slots."""
        with self._lock:
            self.acct.dropped[reason] += n
            self.accepted -= n

    def trained(self, versions: list[int]) -> None:
        with self._lock:
            self.acct.trained += len(versions)
            for v in versions:
                self.acct.staleness_trained[self.version - v] += 1

    def advance(self) -> int:
        """The trainer finished an optimizer step: its policy version moves on."""
        with self._lock:
            self.version += 1
            return self.version

    def check(self, present: int) -> None:
        """The accounting invariant against ``present``, the samples physically still in flight (counted by
        the caller, e.g. what is left in the queue): raises naming the numbers if any sample was lost."""
        a = self.acct
        if a.generated != a.trained + sum(a.dropped.values()) + present:
            raise RuntimeError(f"sample accounting broken: generated {a.generated} != trained {a.trained} + "
                               f"dropped {dict(a.dropped)} + present {present} "
                               f"({a.generated - a.trained - sum(a.dropped.values()) - present} unaccounted)")
