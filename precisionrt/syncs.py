"""Counting host synchronisations on CUDA, for tests and benchmarks of the "no host sync" invariant.

``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising CUDA call (a device->host copy, an
``.item()``, a pageable host->device copy, a stream synchronize) emit a warning; this collects them with
where they came from. The first switch into "warn" mode in a process reports itself once: call
``host_syncs(lambda: None)`` before the measurement that counts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def host_syncs(fn: Callable[[], object]) -> list[str]:
    """``file:line`` of every synchronising CUDA call that ``fn()`` makes."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
