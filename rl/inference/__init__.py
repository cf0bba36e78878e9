"""Inference, floor 2 of ``rl``: generating samples with a copy of the policy.

Owns decoding (``decode.py``: the one decode loop, sampling, the attention mask), the local engine with its KV
cache (``rollout.py``), episodes that keep their cache across turns (``sessions.py``), the engine interface
(``engine.py``), where engines run (``executors.py``: local thread or Ray actor; ``placement.py``), several
engines behind one (``pool.py``) and versioned weight sync (``weight_sync.py``).

May import: ``rl.envs``, ``rl.algo`` and ``precisionrt``. Not ``rl.workers`` or the trainer.
"""
