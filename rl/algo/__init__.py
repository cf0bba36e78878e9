"""RL algorithms, floor 1 of ``rl``: the arithmetic of learning from samples, on tensors.

Owns the losses (``losses.py``: GRPO advantages, the PPO surrogate, IcePop and TIS weights: contract C8), the
train/inference mismatch metrics and sequence guards (``mismatch.py``), bounded staleness (``staleness.py``)
and per-layer mismatch attribution (``attribution.py``).

May import: ``rl.envs`` and ``precisionrt`` (any floor), torch. Not ``rl.inference`` or above.
"""
