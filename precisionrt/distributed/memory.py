"""What memory a process has, read before anything is allocated (the commands' estimates in
``precisionrt.run.resources``, and ``from_hf``'s before it builds a model)."""

from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    """Bytes of weights, gradients and AdamW moments."""
    activations: int
    """Bytes kept for the backward pass of one step."""
    logits: int

    @property
    def total(self) -> int:
        return self.parameters + self.activations + self.logits

    def describe(self) -> str:
        return (f"{self.total / GIB:,.1f} GiB (weights, gradients and AdamW state {self.parameters / GIB:,.1f}, "
                f"activations {self.activations / GIB:,.1f}, logits {self.logits / GIB:,.1f})")


def available_memory(device: str = "cpu") -> int | None:
    """Bytes this process may use on ``device`` ("cpu": the machine's available memory shared by the local
    ranks; "cuda": the GPU's total). None when it cannot be read."""
    if device == "cuda":
        import torch   # a CPU-only caller never pays for it

        return torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if ":" in line}
        total = info.get("MemAvailable", info.get("MemTotal"))
    except (OSError, ValueError, IndexError):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None if total is None else total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
