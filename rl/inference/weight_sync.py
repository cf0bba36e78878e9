"""Versioned, bucketed weight sync from the trainer to the rollout engines.

The trainer publishes its weights after each optimizer batch; the rollout side loads them before it generates.
Both run at once (the rollout worker is another thread, or another process behind it), so a publication must
never be seen half-written: a generation runs on one policy version, never on a mix of two.

``WeightChannel`` holds ``slots`` (default 2) complete copies of the weights. Each copy is a set of flat
buckets of at most ``rl.sync_bucket_mb`` MiB (one dtype per bucket, tensors packed in state-dict order), so a
publication is a few large copies instead of one per tensor, and a copy that lives elsewhere (pinned host
memory for another process, another device) moves in large transfers.

* ``publish(state, version, map_version)`` copies into a slot that no reader holds (waiting for one if
  needed), then *commits* it: one assignment under the lock makes it the newest. On CUDA the copies are
  non-blocking (into pinned host buffers when the consumer is not on the trainer's device) and the commit
  carries an event that readers wait on, so the trainer never waits for its own copies.
* ``acquire()`` hands a reader the newest committed slot and holds it until ``release``: a publication never
  writes into a slot that is being read. What the reader sees is one version, whole.

Each slot is tagged with the policy version and the precision-map version it was published with.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

MIB = 2**20


@dataclass(frozen=True)
class Entry:
    name: str
    bucket: int
    offset: int        # elements into the bucket
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a state dict lives in the buckets."""
    entries: tuple[Entry, ...]
    buckets: tuple[tuple[torch.dtype, int], ...]   # (dtype, elements) of each bucket

    @classmethod
    def of(cls, state: dict[str, torch.Tensor], bucket_bytes: int) -> "Layout":
        entries, buckets, open_bucket = [], [], {}   # dtype -> index of its bucket being filled
        for name, t in state.items():
            size = t.numel() * t.element_size()
            i = open_bucket.get(t.dtype)
            if i is None or (buckets[i][1] * t.element_size() + size > bucket_bytes and buckets[i][1] > 0):
                i = open_bucket[t.dtype] = len(buckets)
                buckets.append([t.dtype, 0])
            entries.append(Entry(name, i, buckets[i][1], tuple(t.shape)))
            buckets[i][1] += t.numel()
        return cls(tuple(entries), tuple((d, n) for d, n in buckets))

    def matches(self, state: dict[str, torch.Tensor]) -> bool:
        return [e.name for e in self.entries] == list(state) and all(
            e.shape == tuple(state[e.name].shape) and self.buckets[e.bucket][0] == state[e.name].dtype
            for e in self.entries)

    @property
    def nbytes(self) -> int:
        return sum(n * d.itemsize for d, n in self.buckets)


class PackedState(Mapping):
    """A state dict in buckets: ``state[name]`` is a view into its bucket. Pickles as the buckets and the layout
    (a Ray actor receives a few large tensors, not one per parameter). ``copy()`` owns its buckets."""

    def __init__(self, layout: Layout, buffers: list[torch.Tensor]):
        self.layout, self.buffers = layout, buffers
        self._entries = {e.name: e for e in layout.entries}

    def __getitem__(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        return self.buffers[e.bucket][e.offset:e.offset + math.prod(e.shape)].view(e.shape)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def copy(self) -> "PackedState":
        return PackedState(self.layout, [b.clone() for b in self.buffers])

    def __reduce__(self):
        # as byte arrays: pickle (protocol 5) and Ray's object store move numpy buffers as they are, where a torch
        # storage goes through torch's own serialisation (25x slower at 100M parameters, tools/bench_weight_sync.py)
        return _unpack, (self.layout, [b.detach().cpu().view(torch.uint8).numpy() for b in self.buffers])


def _unpack(layout: Layout, arrays: list) -> PackedState:
    with warnings.catch_warnings():   # the object store's buffers are read-only: the state is only read from
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return PackedState(layout, [torch.from_numpy(a).view(d) for a, (d, _) in zip(arrays, layout.buckets)])


@dataclass(eq=False)
class Slot:
    state: PackedState
    version: int = -1
    map_version: int = -1
    readers: int = 0
    ready: object = None   # a CUDA event the copies recorded; None when they are already complete


@dataclass
class WeightChannel:
    """``bucket_mb``: the largest bucket (a tensor larger than that gets a bucket of its own). ``device``: where
    the buckets live: the consumer's device, or ``"pinned"`` for host memory that CUDA copies into
    asynchronously (a consumer in another process or on another device)."""
    bucket_mb: float = 256.0
    device: str = "cpu"
    slots: int = 2
    publications: int = 0
    _slots: list[Slot] = field(default_factory=list)
    _newest: Slot | None = None
    _lock: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self):
        if self.slots < 2:
            raise ValueError(f"a weight channel needs 2 or more slots (one read while the next is written), "
                             f"got {self.slots}")
        if not self.bucket_mb > 0:
            raise ValueError(f"rl.sync_bucket_mb must be > 0, got {self.bucket_mb}")

    @property
    def version(self) -> int:
        """The newest committed policy version (-1 before any)."""
        with self._lock:
            return -1 if self._newest is None else self._newest.version

    def publish(self, state: dict[str, torch.Tensor], version: int, map_version: int = -1) -> None:
        """Copy ``state`` (the trainer's tensors, on any device) into a free slot and commit it as ``version``."""
        slot = self._free_slot(state)
        self._copy_into(slot, state)
        slot.version, slot.map_version = version, map_version
        with self._lock:
            self._newest = slot   # the commit: readers from now on get this version, whole
            self.publications += 1
            self._lock.notify_all()

    def _free_slot(self, state: dict[str, torch.Tensor]) -> Slot:
        """A slot that is neither the newest nor being read (waiting for a reader to release one), laid out for
        ``state`` (new buffers when the state's tensors changed)."""
        with self._lock:
            while True:
                free = [s for s in self._slots if s is not self._newest and s.readers == 0]
                if free or len(self._slots) < self.slots:
                    break
                self._lock.wait()
            if free and free[0].state.layout.matches(state):
                return free[0]
            if free:
                self._slots.remove(free[0])
            layout = Layout.of(state, int(self.bucket_mb * MIB))
            slot = Slot(PackedState(layout, [self._empty(d, n) for d, n in layout.buckets]))
            self._slots.append(slot)
            return slot

    def _empty(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        if self.device == "pinned":
            return torch.empty(n, dtype=dtype, pin_memory=torch.cuda.is_available())
        return torch.empty(n, dtype=dtype, device=self.device)

    def _copy_into(self, slot: Slot, state: dict[str, torch.Tensor]) -> None:
        cuda = any(t.is_cuda for t in state.values())
        for name, dst in slot.state.items():
            dst.copy_(state[name].detach(), non_blocking=cuda)
        slot.ready = None
        if cuda:
            slot.ready = torch.cuda.Event()
            slot.ready.record()

    @contextmanager
    def acquire(self) -> Iterator[Slot]:
        """The newest committed slot, held (no publication writes into it) until the block ends; its copies are
        complete when the block starts. Raises LookupError before the first publication."""
        with self._lock:
            slot = self._newest
            if slot is None:
                raise LookupError("no weights were published yet")
            slot.readers += 1
        try:
            if slot.ready is not None:
                slot.ready.synchronize()   # the reader's thread waits for the copies, never the trainer's
            yield slot
        finally:
            with self._lock:
                slot.readers -= 1
                self._lock.notify_all()


def own_copy(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A copy of ``state`` that its holder owns (a slot's view is valid only while the slot is held)."""
    if isinstance(state, PackedState):
        return state.copy()
    return {k: v.detach().clone() for k, v in state.items()}


def channel_device(weights: Mapping[str, torch.Tensor], engine) -> str:
    """Where a channel's buckets live: on the engine's device when the trainer's weights are there too (one
    device-to-device copy), in pinned host memory when CUDA weights go elsewhere (another process, another
    device: asynchronous copies), else in host memory."""
    trainer = next(iter(weights.values())).device
    if trainer == engine.device:
        return str(trainer)
    return "pinned" if trainer.type == "cuda" else "cpu"
