"""Where rollouts run: ``local`` (the engine in the trainer's process, driven by a worker thread) or ``ray``
(the engine in a Ray actor on a local cluster bound to 127.0.0.1, so generation runs in its own process).

Both implement ``rl.inference.engine.InferenceEngine``, the interface the trainer uses.
"""

from __future__ import annotations

import torch

from precisionrt.models.gpt import ModelConfig
from rl.inference.engine import InferenceEngine, WorkerLost
from rl.inference.rollout import RolloutConfig, RolloutEngine
from rl.inference.decode import Completion


class _Actor:
    """Runs inside the Ray worker process: its own torch.distributed world of one, its own policy copy."""

    def __init__(self, model_cfg: ModelConfig, cfg: RolloutConfig):
        from precisionrt.distributed.parallel import init_parallel

        torch.set_num_threads(1)
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")   # Ray's GPU, if any
        init_parallel(1, device=device)
        self.engine = RolloutEngine(model_cfg, cfg, device)

    def load_weights(self, state: dict, version: int) -> int:
        self.engine.load_weights(state, version)
        return version

    def set_precisions(self, precisions: dict[str, str], map_version: int, rollout_bf16=()) -> int:
        self.engine.set_precisions(precisions, map_version, rollout_bf16)
        return map_version

    def precisions(self) -> dict[str, str]:
        return self.engine.precisions()

    def score(self, sequences: list[list[int]], starts: list[int], bf16_layers: list[str]) -> list[list[float]]:
        return self.engine.score(sequences, starts, bf16_layers)

    def generate(self, prompts: list[bytes], max_new_tokens: int, seed: int, keys=None) -> list[Completion]:
        generator = torch.Generator(self.engine.device).manual_seed(seed)
        return self.engine.generate(prompts, max_new_tokens, generator, keys=keys)

    def pid(self) -> int:
        import os
        return os.getpid()


class RolloutActorLost(WorkerLost):
    """The Ray rollout actor died during a call; the engine has started a new one (the call's rollouts are
    lost: the trainer counts them as failed and goes on)."""


class RayRolloutEngine:
    """The rollout engine in a Ray actor. An actor that dies (killed, out of memory, crashed) is noticed at
    the call that fails, not after a timeout: the engine starts a fresh actor with the last weights, up to
    ``max_restarts`` times, and raises ``RolloutActorLost`` for that call."""

    def __init__(self, model_cfg: ModelConfig, cfg: RolloutConfig, object_store_mib: int = 256,
                 max_restarts: int = 3, num_cpus: int = 2, num_gpus: float = 0.0):
        try:
            import ray
        except ImportError:
            raise ImportError("executor.kind = 'ray' needs ray: pip install -e '.[ray]'") from None
        self.ray, self.model_cfg, self.version, self.map_version = ray, model_cfg, -1, -1
        self.device = torch.device("cpu")   # the caller's generator only draws the actor's seed
        if not ray.is_initialized():
            ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     object_store_memory=object_store_mib * 2**20, log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        self.cfg, self.max_restarts, self.restarts, self.num_gpus = cfg, max_restarts, 0, num_gpus
        self._weights: tuple[dict, int] | None = None
        self._map: tuple[dict, int] | None = None
        self.actor = self._start_actor()

    def _start_actor(self):
        return self.ray.remote(num_cpus=1, num_gpus=self.num_gpus)(_Actor).remote(self.model_cfg, self.cfg)

    def _call(self, method: str, *args):
        from ray.exceptions import RayActorError

        try:
            return self.ray.get(getattr(self.actor, method).remote(*args))
        except RayActorError as e:
            if self.restarts >= self.max_restarts:
                raise RolloutActorLost(f"the rollout actor died {self.restarts + 1} times; no restart left: "
                                       f"{e}") from e
            self.restarts += 1
            self.actor = self._start_actor()
            if self._weights is not None:
                self.ray.get(self.actor.load_weights.remote(*self._weights))
            if self._map is not None:
                self.ray.get(self.actor.set_precisions.remote(*self._map))
            raise RolloutActorLost(f"the rollout actor died during {method} (restart {self.restarts} of "
                                   f"{self.max_restarts}): {type(e).__name__}") from e

    def load_weights(self, state: dict, version: int) -> None:
        """Into the object store once (a few buckets when ``state`` is packed): the actor loads from there, and
        a restarted actor too (``state`` is the caller's only for this call)."""
        ref = self.ray.put(state)
        self._weights = (ref, version)
        self.version = self._call("load_weights", ref, version)

    def set_precisions(self, precisions: dict[str, str], map_version: int, rollout_bf16=()) -> None:
        self._map = (precisions, map_version, tuple(rollout_bf16))
        self.map_version = self._call("set_precisions", *self._map)

    def precisions(self) -> dict[str, str]:
        return self._call("precisions")

    def pid(self) -> int:
        """The actor's process id."""
        return self._call("pid")

    def score(self, sequences: list[list[int]], starts: list[int], bf16_layers: list[str]) -> list[list[float]]:
        return self._call("score", sequences, starts, bf16_layers)

    def generate(self, prompts: list[bytes], max_new_tokens: int, generator: torch.Generator,
                 keys: list | None = None) -> list[Completion]:
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        return self._call("generate", prompts, max_new_tokens, seed, keys)

    def close(self) -> None:
        if self.ray.is_initialized():   # several engines share the cluster: the first close ends it
            self.ray.kill(self.actor)
            self.ray.shutdown()


def make_engine(kind: str, model_cfg: ModelConfig, cfg: RolloutConfig, num_workers: int = 1,
                device: torch.device | str = "cpu", num_gpus: float = 0.0, object_store_mib: int = 256
                ) -> InferenceEngine:
    """``num_workers`` engines (Ray actors of ``num_gpus`` GPUs each, or policy copies in this process on
    ``device``) behind one interface (``rl.inference.pool.EnginePool``); one is the engine itself."""
    def one():
        if kind == "ray":
            return RayRolloutEngine(model_cfg, cfg, object_store_mib, num_cpus=max(2, num_workers), num_gpus=num_gpus)
        return RolloutEngine(model_cfg, cfg, device)
    if num_workers == 1:
        return one()
    from rl.inference.pool import EnginePool
    return EnginePool([one() for _ in range(num_workers)])
