"""Shim (old path): the offline analysis lives in ``precisionrt.observe.analysis``. Kept because DESIGN.md and
users' notebooks name ``precisionrt.analysis``. Imports neither torch nor megatron."""

from precisionrt.observe.analysis import *  # noqa: F401,F403
from precisionrt.observe.analysis import __all__  # noqa: F401
