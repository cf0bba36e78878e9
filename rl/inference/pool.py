"""Several rollout engines behind the one-engine interface (``executor.num_workers``).

A call to ``generate`` splits its prompts into one contiguous share per engine and runs the shares side by side
(threads: each engine's work is torch kernels or a Ray actor call, both of which release the GIL). Weights and
precision maps are not pushed to every engine at each publication: the pool keeps the newest, and an engine
pulls them (by version, ``load_weights``/``set_precisions``) just before it next generates, only when it is
behind. Each completion records the version of the engine that made it. An engine that fails fails the call
(its rollouts are counted as failed, as for one engine; ``WorkerLost`` passes through).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from rl.inference.decode import Completion
from rl.inference.weight_sync import own_copy


class EnginePool:
    def __init__(self, engines: list):
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        self.engines = engines
        self.model_cfg = engines[0].model_cfg
        self.device = torch.device("cpu")   # the caller's generator only seeds one per engine, on its device
        self.version, self.map_version = -1, -1
        self._weights: tuple[dict, int] | None = None
        self._map: tuple | None = None
        self._threads = ThreadPoolExecutor(len(engines), thread_name_prefix="rollout-engine")
        self.pulls = [0] * len(engines)   # weight loads per engine: only when it was behind

    def load_weights(self, state: dict, version: int) -> None:
        """The newest weights; each engine takes them when it next generates (from the pool's own copy: ``state``
        is the caller's only for this call)."""
        self._weights, self.version = (own_copy(state), version), version

    def set_precisions(self, precisions: dict[str, str], map_version: int, rollout_bf16=()) -> None:
        self._map, self.map_version = (precisions, map_version, tuple(rollout_bf16)), map_version

    def _sync(self, i: int) -> None:
        engine = self.engines[i]
        if self._weights is not None and engine.version < self._weights[1]:
            engine.load_weights(*self._weights)
            self.pulls[i] += 1
        if self._map is not None and engine.map_version < self._map[1]:
            engine.set_precisions(*self._map)

    def precisions(self) -> dict[str, str]:
        self._sync(0)
        return self.engines[0].precisions()

    def score(self, sequences: list[list[int]], starts: list[int], bf16_layers: list[str]) -> list[list[float]]:
        self._sync(0)
        return self.engines[0].score(sequences, starts, bf16_layers)

    def generate(self, prompts: list[bytes], max_new_tokens: int, generator: torch.Generator,
                 keys: list | None = None) -> list[Completion]:
        n = min(len(self.engines), len(prompts))
        bounds = [len(prompts) * k // n for k in range(n + 1)]
        # one generator per share, seeded from the caller's: torch generators are not shared across threads
        seeds = torch.randint(2**62, (n,), generator=generator).tolist()

        def share(i: int) -> list[Completion]:
            self._sync(i)
            # an episode on another engine than last time misses its cache: a full encode, the same result
            share_keys = {} if keys is None else {"keys": keys[bounds[i]:bounds[i + 1]]}
            engine = self.engines[i]
            return engine.generate(prompts[bounds[i]:bounds[i + 1]], max_new_tokens,
                                   torch.Generator(engine.device).manual_seed(seeds[i]), **share_keys)
        return [c for part in self._threads.map(share, range(n)) for c in part]

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        for engine in self.engines:
            engine.close()
