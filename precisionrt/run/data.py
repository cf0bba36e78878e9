"""A byte-level text corpus that exists on every machine: Python sources already on it.

``data.source``:

* ``stdlib`` (default): the standard library's own sources (tests excluded), read in sorted path order until
  ``max_bytes``: the same corpus on every machine with the same Python version (9 MB or more).
* ``python``: the standard library, then every installed package of the running interpreter (its
  ``purelib`` and ``platlib`` directories), each root in sorted path order: tens to hundreds of MB, enough
  for a 150M-parameter model not to overfit in a few hundred steps. The same on machines with the same
  Python and the same installed packages; the byte count is printed and kept in the summary.

Batches are a pure function of ``(seed, step, rank)``: resuming at step N reproduces exactly the batches an
uninterrupted run would have seen, with no loader state to checkpoint.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch

from precisionrt.config import Checked, ConfigError, Range
from precisionrt.models.tokenizer import ByteTokenizer


@dataclass
class DataConfig(Checked):
    max_bytes: Annotated[int, Range(ge=10_000, le=2**40)] = 2_000_000
    heldout_fraction: Annotated[float, Range(gt=0, lt=0.5)] = 0.1
    source: Literal["stdlib", "python"] = "stdlib"

    def heldout_bytes(self) -> int:
        """At most this many held-out bytes (fewer when the sources are shorter than ``max_bytes``)."""
        return self.max_bytes - int(self.max_bytes * (1 - self.heldout_fraction))


def _source_files(source: str):
    """``.py`` files of ``source``, each root in sorted order; a file reached from two roots comes once."""
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"])
    seen: set[Path] = set()
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" not in path.parts and "dist-packages" not in path.parts and "test" not in path.parts:
            seen.add(path)
            yield path
    if source == "stdlib":
        return
    for key in ("purelib", "platlib"):
        root = Path(paths[key])
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            if path not in seen:
                seen.add(path)
                yield path


def python_corpus(max_bytes: int, source: str = "stdlib") -> bytes:
    """Up to ``max_bytes`` of the Python sources ``source`` names (see the module docstring)."""
    chunks, total = [], 0
    for path in _source_files(source):
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
        raise RuntimeError(f"the {source!r} Python sources of this interpreter yield only {len(corpus)} bytes")
    return corpus


def stdlib_corpus(max_bytes: int) -> bytes:
    return python_corpus(max_bytes, "stdlib")


class ByteCorpus:
    """Train/held-out split of the corpus as token ids, served as ``[batch, seq + 1]`` windows: its bytes
    (ids 0..255) by default, or the ids of ``tokenizer`` (a Hugging Face model's; the text decoded as UTF-8,
    undecodable bytes replaced)."""

    vocab_size = 256

    def __init__(self, cfg: DataConfig, tokenizer=None):
        raw = python_corpus(cfg.max_bytes, cfg.source)
        self.num_bytes = len(raw)
        if tokenizer is None or isinstance(tokenizer, ByteTokenizer):
            data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        else:
            data = torch.tensor(tokenizer.encode(raw.decode("utf-8", errors="replace")), dtype=torch.long)
            self.vocab_size = tokenizer.vocab_size
        self.num_tokens = len(data)
        split = int(len(data) * (1 - cfg.heldout_fraction))
        self.train, self.heldout = data[:split], data[split:]

    def check_fits(self, seq_len: int) -> None:
        """Refuse a sequence longer than the split it is drawn from (the sources may hold fewer bytes than
        ``data.max_bytes``)."""
        if seq_len + 2 > min(len(self.train), len(self.heldout)):
            raise ConfigError(f"model.seq_length ({seq_len}) does not fit the corpus: {len(self.train):,} training "
                              f"and {len(self.heldout):,} held-out tokens; raise data.max_bytes or shorten the "
                              "sequence")

    def train_batch(self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0) -> torch.Tensor:
        # modulo 2^63: any train.seed (up to 2^63 - 1) gives a generator seed; smaller ones are unchanged
        g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + rank) % 2**63)
        starts = torch.randint(0, len(self.train) - seq_len - 1, (batch_size,), generator=g)
        return torch.stack([self.train[s: s + seq_len + 1] for s in starts.tolist()])

    def heldout_batches(self, n_batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
        """Evenly spaced, fixed held-out windows (the same every evaluation)."""
        n = n_batches * batch_size
        starts = torch.linspace(0, len(self.heldout) - seq_len - 2, n).long().tolist()
        windows = torch.stack([self.heldout[s: s + seq_len + 1] for s in starts])
        return list(windows.split(batch_size))

    def unigram_loss(self) -> float:
        """Cross-entropy (nats/token) on held-out data of the add-one-smoothed train token frequencies."""
        counts = torch.bincount(self.train, minlength=self.vocab_size).double() + 1
        logp = (counts / counts.sum()).log()
        return float(-logp[self.heldout].mean()) if len(self.heldout) else math.nan
