"""Rollout workers, floor 3 of ``rl``: turning prompts into scored samples, many episodes in flight.

Owns the single-turn worker (``worker.py``), the multi-turn agent worker (``agent_worker.py``) and the episode
loop with its decode batcher (``agent.py``).

May import: ``rl.envs``, ``rl.algo``, ``rl.inference`` and ``precisionrt``. The trainer and the command sit
above (``rl.trainer``, ``rl.warm_start``, ``rl.workload``, ``rl.train``).
"""
