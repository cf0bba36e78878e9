"""Shim (old path): megatron's schedules for precisionrt live in ``precisionrt.distributed.pipeline``. Kept
because earlier READMEs' pipeline example imports from here."""

from precisionrt.distributed.pipeline import *  # noqa: F401,F403
from precisionrt.distributed.pipeline import __all__  # noqa: F401
