"""rl: asynchronous RL with the precision runtime inside. It uses ``precisionrt``; ``precisionrt`` never imports it.

Floors, each importing only those below it (``tests/test_architecture.py``): ``envs`` (tasks and tool
environments) < ``algo`` (losses, mismatch, staleness, attribution) < ``inference`` (decoding, engines, weight
sync, placement) < ``workers`` (rollout workers) < the trainer side (``trainer.py``, ``warm_start.py``,
``workload.py``) < the command (``train.py``: ``python -m rl.train``).

``rl.losses`` is a shim kept for contract C8 (``rl.losses.icepop_weights``).
"""
