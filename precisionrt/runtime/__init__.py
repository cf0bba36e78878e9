"""The precision runtime, floor 4: what watches the layers and decides their precision while a run goes on.

Owns ``PrecisionRuntime`` (contract C2, ``precision_runtime.py``: wiring only) and its parts: the whole
model's layer table under any parallel layout (``layer_table.py``), the monitors that turn statistics into
signals (``monitors.py``), the policy that turns signals into decisions (``policy.py``, torch-free), the
sampling schedule (``sampling.py``), skipped steps (``skips.py``), FLOP accounting (``flops.py``), the
operator control file (``control.py``) and the runtime's state in megatron's ``sharded_state_dict``
(``dist_state.py``).

May import: ``config``, ``observe``, ``numerics``, ``distributed``, ``layers``, torch and megatron-core.
``PrecisionRuntime`` and ``RuntimeConfig`` are importable from here (loaded on first use).
"""

from __future__ import annotations

import importlib

_HOME = {"PrecisionRuntime": "precisionrt.runtime.precision_runtime",
         "RuntimeConfig": "precisionrt.runtime.precision_runtime"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'precisionrt.runtime' has no attribute {name!r}")
