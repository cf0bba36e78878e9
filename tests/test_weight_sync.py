"""Versioned, bucketed weight sync (issue 24, item 3): what a reader gets is one version, whole, bit for bit.

The atomicity tests make the consumer slow (each tensor it loads takes a while) so that publications land while
it loads; a channel that wrote into the slot being read would hand the engine a mix of two versions, and the
fingerprint check at every generation would see it.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Mapping

import pytest
import torch

from rl.inference import rollout
from rl.inference.weight_sync import Layout, WeightChannel, own_copy
from rl_common import run


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"emb": torch.randn(50, 8, generator=g) * scale,
            "w1": (torch.randn(16, 8, generator=g) * scale).to(torch.bfloat16),
            "big": torch.randn(300, generator=g) * scale,          # larger than a bucket: a bucket of its own
            "b1": (torch.randn(16, generator=g) * scale).to(torch.bfloat16),
            "step": torch.tensor(seed)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_a_publication_round_trips_bit_for_bit_in_buckets_of_one_dtype():
    state = _state(0)
    layout = Layout.of(state, bucket_bytes=1024)
    members = {i: [e.name for e in layout.entries if e.bucket == i] for i in range(len(layout.buckets))}
    # emb (1600 B: over the limit, alone), w1 + b1 (bf16, 288 B), big (1200 B, alone), step (int64)
    assert sorted(members.values()) == [["big"], ["emb"], ["step"], ["w1", "b1"]]
    for i, (dtype, n) in enumerate(layout.buckets):
        assert n * dtype.itemsize <= 1024 or len(members[i]) == 1
        assert all(state[name].dtype == dtype for name in members[i])
    channel = WeightChannel(bucket_mb=1024 / 2**20)
    channel.publish(state, version=3, map_version=2)
    with channel.acquire() as slot:
        assert (slot.version, slot.map_version) == (3, 2)
        assert list(slot.state) == list(state)
        for name, t in state.items():
            assert slot.state[name].dtype == t.dtype and torch.equal(_bits(slot.state[name]), _bits(t)), name
        wire = pickle.dumps(slot.state)   # what a Ray actor receives: the buckets and the layout, once
        mine = own_copy(slot.state)
    assert len(wire) < layout.nbytes + 4000
    for received in (pickle.loads(wire), mine):
        assert all(torch.equal(_bits(received[k]), _bits(v)) for k, v in state.items())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(mine.buffers, slot.state.buffers))


def test_a_slot_being_read_is_never_written():
    """A reader holds version 1 while versions 2 and 3 are published: 2 goes to the other slot, 3 waits for the
    reader to let go; the reader's tensors stay version 1's throughout."""
    channel = WeightChannel(bucket_mb=1.0)
    channel.publish(_state(1), 1)
    published = []
    with channel.acquire() as slot:
        held = {k: v.clone() for k, v in slot.state.items()}
        channel.publish(_state(2), 2)
        writer = threading.Thread(target=lambda: (channel.publish(_state(3), 3), published.append(3)))
        writer.start()
        time.sleep(0.2)
        assert published == [] and channel.version == 2, "version 3 must wait for the reader"
        assert all(torch.equal(_bits(slot.state[k]), _bits(v)) for k, v in held.items())
    writer.join(timeout=10)
    assert published == [3] and channel.version == 3
    with channel.acquire() as slot:
        assert int(slot.state["step"]) == 3 and torch.equal(slot.state["emb"], _state(3)["emb"])


def test_a_changed_state_gets_new_buckets_and_bad_settings_are_refused():
    channel = WeightChannel(bucket_mb=1.0)
    channel.publish(_state(1), 1)
    grown = {**_state(2), "extra.channel_scale": torch.ones(8)}   # an injected fault's scaling joins the weights
    channel.publish(grown, 2)
    with channel.acquire() as slot:
        assert torch.equal(slot.state["extra.channel_scale"], torch.ones(8))
    channel.publish(_state(3), 3)
    with channel.acquire() as slot:
        assert "extra.channel_scale" not in slot.state and int(slot.state["step"]) == 3
    with pytest.raises(ValueError, match="2 or more slots"):
        WeightChannel(slots=1)
    with pytest.raises(ValueError, match="sync_bucket_mb must be > 0"):
        WeightChannel(bucket_mb=0)
    with pytest.raises(LookupError, match="no weights were published"):
        with WeightChannel().acquire():
            pass


def _fingerprint(state) -> tuple[float, ...]:
    return tuple(float(v.double().sum()) for k, v in sorted(state.items())
                 if isinstance(v, torch.Tensor) and not k.endswith("channel_scale"))


class SlowReader(Mapping):
    """A consumer that reads a slot tensor by tensor, 2 ms apart, as it loads them."""

    def __init__(self, state):
        self.state = state

    def __getitem__(self, k):
        time.sleep(0.002)
        return self.state[k].clone()

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)


@pytest.mark.parametrize("max_staleness", [0, 4])
def test_every_generation_runs_on_one_published_version(tmp_path, monkeypatch, max_staleness):
    """A slow consumer while the trainer publishes: at every generation the engine's weights are exactly those
    the trainer published under the engine's version."""
    published: dict[int, tuple] = {}
    publish, load, generate = WeightChannel.publish, rollout.RolloutEngine.load_weights, \
        rollout.RolloutEngine.generate
    mismatched, loads = [], []

    def recording_publish(self, state, version, map_version=-1):
        published[version] = _fingerprint(state)
        publish(self, state, version, map_version)

    def slow_load(self, state, version):
        loads.append(version)
        load(self, SlowReader(state), version)

    def checked_generate(self, *a, **k):
        if _fingerprint(self.model.state_dict()) != published[self.version]:
            mismatched.append(self.version)
        return generate(self, *a, **k)

    monkeypatch.setattr(WeightChannel, "publish", recording_publish)
    monkeypatch.setattr(rollout.RolloutEngine, "load_weights", slow_load)
    monkeypatch.setattr(rollout.RolloutEngine, "generate", checked_generate)
    s = run(tmp_path, "train.steps=10", f"rl.max_staleness={max_staleness}", "rl.sync_bucket_mb=0.01")
    assert s["steps"] == 10 and len(published) == 11 and len(loads) >= 5
    assert mismatched == []
