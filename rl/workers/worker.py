"""The rollout worker: turns prompts into scored groups for the trainer.

It admits rollouts under staleness control (``rl/algo/staleness.py``), keeps its engine on the newest weights the
trainer published (pulled by version, only when behind), generates, scores and queues each group, or drops it
with a reason. In async mode it runs on a thread of its own; in sync mode the trainer calls ``rollout_once``
when its queue is empty.

Failures are survived up to a limit: a failed call is counted (``failed_rollouts``; ``worker_lost`` when the
engine's worker died holding it) and recorded; ``rl.max_consecutive_rollout_failures`` in a row, or more than
``rl.max_failed_rollout_fraction`` of all rollouts, end the run with the last error. Any other exception ends
the worker and is raised in the trainer at its next wait, with the worker's traceback.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import random
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from rl.inference.engine import InferenceEngine, WorkerLost
from rl.envs import Problem
from rl.inference.decode import Completion
from rl.algo.staleness import StalenessController
from rl.inference.weight_sync import WeightChannel, channel_device

log = logging.getLogger(__name__)
_KEPT_ERRORS = 100   # the newest rollout errors kept for reports (the count is in the accounting)


class RolloutFailure(RuntimeError):
    """Rollouts cannot go on: too many failed, or the rollout worker died."""


@dataclass
class Group:
    problem: Problem
    completions: list[Completion]
    rewards: list[float]
    version: int


@dataclass
class Counters:
    """Where time went, for the run's idle ratios (the trainer adds its own wait), and the rollout errors."""
    rollout_wait: float = 0.0
    """Rollout worker blocked by admission control."""
    rollout_busy: float = 0.0
    generated_tokens: int = 0
    """Completion tokens the engine generated (``rollout_tokens_per_s`` = these / ``rollout_busy``)."""
    trainer_wait: float = 0.0
    """Trainer waiting for samples."""
    errors: list = field(default_factory=list)


class RolloutWorker:
    def __init__(self, engine: InferenceEngine, task, ctrl: StalenessController, algo, max_new_tokens: int,
                 seed: int, weights: dict, precisions: dict[str, str]):
        self.engine, self.task, self.ctrl, self.algo = engine, task, ctrl, algo
        self.max_new_tokens = max_new_tokens
        self.batch_samples = algo.prompts_per_step * algo.group_size
        self.queue: queue.Queue[Group] = queue.Queue()
        self.counters = Counters()
        self.consecutive_failures = 0
        self.rng = random.Random(seed)                    # which problems
        self.generator = torch.Generator(engine.device).manual_seed(seed)   # which tokens (where they are drawn)
        self._weights_lock = threading.Lock()
        self.engine_lock = threading.Lock()   # one user of the engine at a time: the worker, or an attribution
        # the weights: versioned, bucketed, never seen half-written (rl/inference/weight_sync.py)
        self.channel = WeightChannel(algo.sync_bucket_mb, channel_device(weights, engine))
        # precision-map version, the trainer's precisions, the rollout-only BF16 layers
        self._published = (0, precisions, ())
        self.channel.publish(weights, 0, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: tuple[BaseException, str] | None = None
        self.maps_applied: list[tuple[int, int]] = []   # (map version, policy version) as the engine took them
        self._pull_weights()

    # ------------------------------------------------------------------------------------ weights

    def publish(self, version: int, weights: dict) -> None:
        """The trainer's weights (its own tensors: they are copied here, into the weight channel) as ``version``;
        the engine loads them when it next starts a rollout."""
        with self._weights_lock:
            map_version = self._published[0]
        self.channel.publish(weights, version, map_version)

    def publish_precisions(self, map_version: int, precisions: dict[str, str], rollout_bf16=()) -> None:
        """The trainer's per-layer precisions and the layers promoted on the rollout side only, version
        ``map_version``. The trainer publishes a map before the weights it goes with, and the worker reads the
        map after taking the weights, so the engine never runs weights with a map older than theirs."""
        with self._weights_lock:
            self._published = (map_version, dict(precisions), tuple(sorted(rollout_bf16)))

    def _pull_weights(self) -> None:
        with self.channel.acquire() as slot:   # held: no publication writes into it while the engine loads
            if slot.version > self.engine.version:
                self.engine.load_weights(slot.state, slot.version)
            version = slot.version
        with self._weights_lock:   # read after the weights: a map is never older than the weights it goes with
            map_version, precisions, rollout_bf16 = self._published
        if map_version > self.engine.map_version:
            self.engine.set_precisions(precisions, map_version, rollout_bf16)
            self.maps_applied.append((map_version, version))

    # ----------------------------------------------------------------------------------- rollouts

    def rollout_once(self) -> bool:
        """Admit, generate, score and enqueue one batch of groups. False if admission refused."""
        t0 = time.perf_counter()
        if not self.ctrl.try_admit(self.batch_samples):
            return False
        problems = [self.task.sample(self.rng) for _ in range(self.algo.prompts_per_step)]
        g = self.algo.group_size
        try:
            with self.engine_lock:
                self._pull_weights()   # inside: an engine whose worker dies while loading weights fails the rollout
                comps = self.engine.generate([p.prompt for p in problems for _ in range(g)], self.max_new_tokens,
                                             self.generator)
        except Exception as e:  # noqa: BLE001 - a failed rollout is counted, recorded and survived ...
            self._failed(e)   # ... up to the limits it checks
            return True
        self.consecutive_failures = 0
        self.counters.generated_tokens += sum(len(c.tokens) for c in comps)
        self.ctrl.returned(self.batch_samples)
        self.ctrl.created(len(comps))
        for i, problem in enumerate(problems):
            group = comps[i * g:(i + 1) * g]
            self._enqueue(problem, group, [self.task.reward(problem, self.task.decode(c.tokens)) for c in group])
        self.counters.rollout_busy += time.perf_counter() - t0
        return True

    def _enqueue(self, problem, group: list[Completion], rewards: list) -> None:
        """Queue a generated group for the trainer, or drop it with its reason."""
        reason = None
        if any(len(c.tokens) == 0 for c in group):
            reason = "empty_completion"
        if any(not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 <= r <= 1 for r in rewards):
            reason = "bad_reward"
        if reason:
            self.ctrl.drop(len(group), reason)
        else:   # a group is as stale as its oldest sample (an episode: as its oldest action)
            self.queue.put(Group(problem, group, [float(r) for r in rewards], min(c.version for c in group)))

    def _failed(self, e: Exception, n: int | None = None) -> None:
        """``n`` admitted rollouts (default: a batch) failed with ``e``."""
        n = self.batch_samples if n is None else n
        self.ctrl.returned(n)
        self.ctrl.failed(n, worker_lost=isinstance(e, WorkerLost))
        self.counters.errors.append(f"{type(e).__name__}: {e}")
        del self.counters.errors[:-_KEPT_ERRORS]
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.algo.max_consecutive_rollout_failures:
            raise RolloutFailure(f"{self.consecutive_failures} rollouts in a row failed; the last: "
                                 f"{type(e).__name__}: {e}") from e
        # Failures that are not consecutive can still be most of the rollouts (a policy whose weights blew up
        # samples from NaN probabilities most of the time): counted from five batches of failures on.
        with self.ctrl.lock:
            failed, made = self.ctrl.acct.failed_rollouts, self.ctrl.acct.generated
        limit = self.algo.max_failed_rollout_fraction
        if failed >= 5 * self.batch_samples and failed > limit * (failed + made):
            raise RolloutFailure(f"{failed} of {failed + made} rollouts failed (more than "
                                 f"rl.max_failed_rollout_fraction = {limit}); the last: {type(e).__name__}: {e}") from e

    def present_samples(self) -> int:
        """Samples physically in flight: what the queue holds (call with the worker stopped)."""
        return sum(len(g.completions) for g in list(self.queue.queue))

    # ---------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Run on a thread of its own (async mode)."""
        self._thread = threading.Thread(target=self._loop, name="rollout-worker", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                if not self.rollout_once():
                    time.sleep(0.002)
                    self.counters.rollout_wait += time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - not swallowed: handed to the trainer, which raises it
            self._error = (e, traceback.format_exc())

    def raise_if_died(self) -> None:
        if self._error is not None:
            e, tb = self._error
            raise RolloutFailure(f"the rollout worker died: {type(e).__name__}: {e}\n{tb}") from e

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    # --------------------------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict:
        return {"rng": list(self.rng.getstate()[1]), "rng_version": self.rng.getstate()[0],
                "gen": self.generator.get_state(), "gen_device": self.generator.device.type}

    def load_state_dict(self, sd: dict, version: int, weights: dict, map_version: int,
                        precisions: dict[str, str], rollout_bf16=()) -> None:
        """Resume: the RNGs, and the engine on the checkpoint's weights and precision map."""
        self.rng.setstate((sd["rng_version"], tuple(sd["rng"]), None))
        saved_on = sd.get("gen_device", "cpu")
        if saved_on == self.generator.device.type:
            self.generator.set_state(sd["gen"])
        else:   # a generator's state is device-specific: continue from a seed the saved state decides
            seed = int.from_bytes(hashlib.sha256(sd["gen"].numpy().tobytes()).digest()[:8], "little")
            self.generator.manual_seed(seed)
            log.warning("resume: the sampling generator was saved on %s and runs on %s now: reseeded from its "
                        "saved state (samples differ from an uninterrupted run's)", saved_on,
                        self.generator.device.type)
        with self._weights_lock:
            self._published = (map_version, dict(precisions), tuple(sorted(rollout_bf16)))
        self.channel.publish(weights, version, map_version)
        self.engine.load_weights(weights, version)
        self.engine.set_precisions(precisions, map_version, tuple(sorted(rollout_bf16)))
        self.maps_applied = [(map_version, version)]   # this segment starts from the checkpoint's map
