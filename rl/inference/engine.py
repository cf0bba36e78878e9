"""The rollout engine interface: what the RL trainer needs from whatever generates its samples.

Two engines implement it: ``rl.inference.rollout.RolloutEngine`` (a policy copy in the trainer's process) and
``rl.inference.executors.RayRolloutEngine`` (the same copy in a Ray actor). A user's own inference server fits by
implementing these members. An engine whose worker died while holding a call raises ``WorkerLost``:
the trainer counts that call's rollouts as ``worker_lost`` and goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from precisionrt.models.gpt import ModelConfig
    from rl.inference.decode import Completion


class WorkerLost(RuntimeError):
    """The engine's worker (a process, an actor, a server) died during a call; the call's rollouts are lost.
    The engine may have replaced the worker: the next call is tried as usual."""


@runtime_checkable
class InferenceEngine(Protocol):
    version: int             # the policy version of the weights loaded; -1 before any
    map_version: int         # the version of the trainer's precision map last set; -1 before any
    model_cfg: ModelConfig   # the policy's architecture (sequence length for generation)
    device: torch.device     # where ``generate``'s generator lives (an engine in another process: the CPU)

    def load_weights(self, state: dict, version: int) -> None:
        """Replace the policy's weights with ``state`` (a mapping of tensors, on any device) of ``version``.
        ``state`` is valid during the call only (a slot of ``rl.inference.weight_sync.WeightChannel``): an engine that
        keeps weights past it (to load later, to restart a worker) keeps its own copy."""

    def set_precisions(self, precisions: dict[str, str], map_version: int, rollout_bf16=()) -> None:
        """The trainer's per-layer precisions (``{layer: "fp8" | "bf16"}``) of ``map_version``, and the layers
        promoted on the rollout side only (``rollout_bf16``); each layer then runs as
        ``rl.inference.rollout.rollout_precisions`` says (under ``rollout.precision = "follow"`` the trainer's precision)."""

    def precisions(self) -> dict[str, str]:
        """The precision each rollout layer runs in now."""

    def score(self, sequences: list[list[int]], starts: list[int], bf16_layers: list[str]) -> list[list[float]]:
        """Log-probs of each sequence's tokens from ``starts[i]`` on, as ``generate`` scores them, with
        ``bf16_layers`` in BF16 for this call only."""

    def generate(self, prompts: list[bytes], max_new_tokens: int, generator: torch.Generator,
                 keys: list | None = None) -> list[Completion]:
        """One completion per prompt, each with its tokens, their log-probabilities under the full softmax at
        the sampling temperature, and the policy and precision-map versions that made it. ``keys`` (multi-turn
        episodes, one per prompt) let an engine continue each episode on what it cached for that key."""

    def close(self) -> None:
        """Release the worker; the engine is not used again."""
