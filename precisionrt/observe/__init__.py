"""Observability, floor 0: what a run leaves for people and tools to read, and the tools that read it.

Owns the switch-log schema (contract C4, ``events.py``), the metric loggers (``metrics.jsonl``, W&B:
``loggers.py``), the offline analysis (``analysis.py``) and the ``precisionrt-log`` command (``cli.py``).

May import: ``precisionrt.config`` and the standard library. Never torch or megatron, also not inside a
function: the log tools start fast and run on a laptop that has only the logs (``tests/test_architecture.py``).
"""
