"""The rollout worker for multi-turn environments: many episodes in flight, none blocking the others.

Async mode keeps up to ``rl.groups_in_flight`` GRPO groups going at once on one event loop: each is admitted
by staleness control when it starts, its episodes wait on their tools concurrently, and the episodes ready
to act are decoded together (``rl.workers.agent.DecodeBatcher``, on a thread). The engine pulls the newest weights
before each decode call, so a long episode may span versions: each action keeps its own, and the group is as
stale as its oldest action. A finished group is queued for the trainer at once. Sync mode runs one batch of
groups (``rl.prompts_per_step``) to the end, all in flight together, each time the trainer asks.

Episode statistics (``stats``): error turns (the policy's own failed calls), their masked tokens under
``rl.error_masking``, episodes that recovered from an error, tool calls, timeouts and service failures.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections import Counter

from rl.workers.agent import BYTES, DecodeBatcher, ToolClock, as_completion, run_group
from rl.envs.agent import POLICY_ERRORS
from rl.workers.worker import RolloutWorker


class AgentRolloutWorker(RolloutWorker):
    def __init__(self, engine, env, ctrl, algo, max_new_tokens: int, seed: int, weights: dict,
                 precisions: dict[str, str], max_len: int, turns=BYTES):
        super().__init__(engine, env, ctrl, algo, max_new_tokens, seed, weights, precisions)
        self.env, self.max_len, self.turns = env, max_len, turns
        self.clock = ToolClock()
        self.stats: Counter = Counter()
        self._stats_lock = threading.Lock()
        self._batcher: DecodeBatcher | None = None

    def _decode(self, prompts: list[list[int]], keys: list[str]):
        """One decode call (on the batcher's thread): the newest weights first, then one action per prompt (the
        engine may continue each episode on its cached keys and values)."""
        t0 = time.perf_counter()
        with self.engine_lock:
            self._pull_weights()
            comps = self.engine.generate(prompts, self.max_new_tokens, self.generator, keys=keys)
        self.counters.rollout_busy += time.perf_counter() - t0
        self.counters.generated_tokens += sum(len(c.tokens) for c in comps)
        return comps

    async def _group(self) -> None:
        """One admitted group, from reset to the queue (or to a counted failure)."""
        g = self.algo.group_size
        try:
            problem, results = await run_group(self.env, self.rng, g, self._batcher, self.max_new_tokens,
                                               self.max_len, self.clock, self.turns)
        except Exception as e:  # noqa: BLE001 - a failed group is counted, recorded and survived (with limits)
            self._failed(e, g)
            return
        self.consecutive_failures = 0
        comps = [as_completion(r, self.algo.error_masking) for r in results]
        self.ctrl.returned(g)
        self.ctrl.created(g)
        self._enqueue(problem, comps, [r.reward for r in results])
        with self._stats_lock:
            for r, c in zip(results, comps):
                errors = [s for s in r.transcript.segments if s.kind == "action" and s.error in POLICY_ERRORS]
                self.stats.update({"episodes": 1, "error_turns": len(errors), "recovered_episodes": int(r.recovered),
                                   "error_masked_tokens": sum(len(s.tokens) for s in errors)
                                   if self.algo.error_masking else 0})

    def take_stats(self) -> dict:
        """The episode statistics since the last call, with the environment's tool counters."""
        with self._stats_lock:
            out, self.stats = dict(self.stats), Counter()
        return {**out, **{f"tool_{k}": v for k, v in self.env.stats.items()}}

    # ------------------------------------------------------------------------------------- modes

    def rollout_once(self) -> bool:
        """Sync mode: one batch of groups, all in flight together, to the end."""
        if not self.ctrl.try_admit(self.batch_samples):
            return False

        async def batch():
            self._batcher = DecodeBatcher(self._decode)
            await asyncio.gather(*(self._group() for _ in range(self.algo.prompts_per_step)))
        asyncio.run(batch())
        return True

    def _loop(self) -> None:
        try:
            asyncio.run(self._async_loop())
        except BaseException as e:  # noqa: BLE001 - not swallowed: handed to the trainer, which raises it
            self._error = (e, traceback.format_exc())

    async def _async_loop(self) -> None:
        self._batcher = DecodeBatcher(self._decode)
        g, tasks = self.algo.group_size, set()
        try:
            while not self._stop.is_set():
                while len(tasks) < self.algo.groups_in_flight and self.ctrl.try_admit(g):
                    tasks.add(asyncio.create_task(self._group()))
                if not tasks:   # admission control holds the rollouts back
                    t0 = time.perf_counter()
                    await asyncio.sleep(0.002)
                    self.counters.rollout_wait += time.perf_counter() - t0
                    continue
                done, tasks = await asyncio.wait(tasks, timeout=0.01, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()   # a RolloutFailure (too many failed groups) ends the worker
        finally:   # groups cut off by the stop made no sample: their admissions are simply not used
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
