"""A byte-level text corpus that exists on every machine: the Python standard library's own sources.

Files are read in sorted path order until ``max_bytes``, so the corpus is the same on every machine with the
same Python version. Batches are a pure function of ``(seed, step, rank)``: resuming at step N reproduces
exactly the batches an uninterrupted run would have seen, with no loader state to checkpoint.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class DataConfig:
    max_bytes: int = 2_000_000
    heldout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.max_bytes < 10_000:
            raise ValueError(f"max_bytes must be >= 10000, got {self.max_bytes}")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}")


def stdlib_corpus(max_bytes: int) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue  # unreadable file on an odd install: the corpus is still deterministic per machine
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    corpus = b"".join(chunks)[:max_bytes]
    if len(corpus) < 10_000:
        raise RuntimeError(f"standard library sources under {root} yield only {len(corpus)} bytes")
    return corpus


class ByteCorpus:
    """Train/held-out split of a byte corpus, served as ``[batch, seq + 1]`` windows of token ids 0..255."""

    vocab_size = 256

    def __init__(self, cfg: DataConfig):
        data = torch.frombuffer(bytearray(stdlib_corpus(cfg.max_bytes)), dtype=torch.uint8).long()
        split = int(len(data) * (1 - cfg.heldout_fraction))
        self.train, self.heldout = data[:split], data[split:]

    def train_batch(self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
        starts = torch.randint(0, len(self.train) - seq_len - 1, (batch_size,), generator=g)
        return torch.stack([self.train[s: s + seq_len + 1] for s in starts.tolist()])

    def heldout_batches(self, n_batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
        """Evenly spaced, fixed held-out windows (the same every evaluation)."""
        n = n_batches * batch_size
        starts = torch.linspace(0, len(self.heldout) - seq_len - 2, n).long().tolist()
        windows = torch.stack([self.heldout[s: s + seq_len + 1] for s in starts])
        return list(windows.split(batch_size))

    def unigram_loss(self) -> float:
        """Cross-entropy (nats/byte) on held-out data of the add-one-smoothed train byte frequencies."""
        counts = torch.bincount(self.train, minlength=256).double() + 1
        logp = (counts / counts.sum()).log()
        return float(-logp[self.heldout].mean()) if len(self.heldout) else math.nan
