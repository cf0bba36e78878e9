"""Host synchronisations: counting them (the "no host sync" invariant, in tests and benchmarks) and avoiding
them when data goes to the device.

On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising call (a device->host copy, an
``.item()``, a pageable host->device copy, a stream synchronize) emit a warning; ``host_syncs`` collects them
with where they came from. The first switch into "warn" mode in a process reports itself once: call
``host_syncs(lambda: None)`` before the measurement that counts.

On any device, ``HostReads`` counts the calls that read a tensor's values into Python (``item``, ``tolist``,
``bool``/``int``/``float`` of a tensor, ``cpu``, ...). On CUDA each of those is a synchronisation; on
the CPU nothing synchronises, so this is how a CPU test holds code to the budget it will have on a GPU. It cannot
see the CUDA synchronisations that read no value into Python (an operation whose output size depends on the data:
boolean-mask indexing, ``nonzero``, ``unique``) nor pageable host-to-device copies: ``host_syncs`` on CUDA does.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode

# ``numpy()`` / ``__array__`` are not here: on a CUDA tensor they raise instead of synchronising, so they only
# ever follow a ``cpu()`` that was counted already.
READS = frozenset({"item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__", "__complex__"})


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


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values into Python made while active (on every thread: torch function modes are
    per thread, so use it on the thread that does the work). ``sites`` holds ``(read, "file:line")`` of the
    caller outside torch for each read."""

    def __init__(self):
        super().__init__()
        self.sites: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            frame = next((f for f in reversed(traceback.extract_stack(limit=12)[:-1])
                          if "/torch/" not in f.filename), None)
            self.sites.append((name, f"{frame.filename}:{frame.lineno}" if frame else "?"))
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return len(self.sites)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory, asynchronously (no host synchronisation)."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
