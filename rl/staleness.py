"""Bounded staleness for asynchronous RL: policy versions, admission control, drop rules, accounting.

A sample's staleness is ``trainer_version_at_consumption - version_that_generated_it``. With bound eta
(``max_staleness``; 0 is on-policy):

* admission control (AReaL's rule): a new rollout may start only while
  ``accepted + running < (eta + version + 1) * batch_size``: the trainer cannot possibly consume more than that
  before its version moves past what the sample could tolerate, so rollouts beyond it could only arrive stale;
* a sample that still arrives with staleness > eta is dropped with reason ``stale`` (or, with
  ``on_stale = "wait"``, never happens because the trainer waits: admission keeps it inside the bound);
* accounting: ``generated == trained + sum(dropped.values()) + in_flight``, checked at the end of every run.

The controller is thread-safe: rollout workers and the trainer share it.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class StalenessConfig:
    max_staleness: int = 2

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")


@dataclass
class Accounting:
    generated: int = 0
    trained: int = 0
    dropped: Counter = field(default_factory=Counter)
    in_flight: int = 0
    staleness_trained: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"generated": self.generated, "trained": self.trained, "dropped": dict(self.dropped),
                "in_flight": self.in_flight}

    def balanced(self) -> bool:
        return self.generated == self.trained + sum(self.dropped.values()) + self.in_flight


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
            self.acct.in_flight += n
            self.acct.generated += n
            return True

    def returned(self, n: int) -> None:
        """``n`` admitted rollouts finished generating (they stay in flight until trained or dropped)."""
        with self._lock:
            self.running -= n

    def staleness(self, sample_version: int) -> int:
        return self.version - sample_version

    def is_stale(self, sample_version: int) -> bool:
        return self.staleness(sample_version) > self.config.max_staleness

    def drop(self, n: int, reason: str) -> None:
        """``n`` samples will never train: count them and free their admission slots."""
        with self._lock:
            self.acct.in_flight -= n
            self.acct.dropped[reason] += n
            self.accepted -= n

    def trained(self, versions: list[int]) -> None:
        with self._lock:
            self.acct.in_flight -= len(versions)
            self.acct.trained += len(versions)
            for v in versions:
                self.acct.staleness_trained[self.version - v] += 1

    def advance(self) -> int:
        """The trainer finished an optimizer step: its policy version moves on."""
        with self._lock:
            self.version += 1
            return self.version

    def check(self) -> None:
        """The accounting invariant; raises naming the numbers if anything was lost."""
        a = self.acct
        if not a.balanced():
            raise RuntimeError(f"sample accounting broken: generated {a.generated} != trained {a.trained} + "
                               f"dropped {dict(a.dropped)} + in flight {a.in_flight}")
