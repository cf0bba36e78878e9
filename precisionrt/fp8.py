"""Shim (old path): FP8 numerics live in ``precisionrt.numerics.fp8``. Kept because contract C1 names
``precisionrt.fp8.quantize``."""

from precisionrt.numerics.fp8 import *  # noqa: F401,F403
from precisionrt.numerics.fp8 import __all__  # noqa: F401
