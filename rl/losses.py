"""Shim (old path): RL losses live in ``rl.algo.losses``. Kept because contract C8 names
``rl.losses.icepop_weights``."""

from rl.algo.losses import *  # noqa: F401,F403
from rl.algo.losses import __all__  # noqa: F401
