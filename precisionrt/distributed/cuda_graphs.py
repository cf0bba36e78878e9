"""CUDA-graph capture of ordinary training steps: forward and backward replayed as one graph launch.

A captured graph replays the kernels of one forward+backward at the same device addresses, so everything it
touches must stay where it is between steps, and the host must not read anything inside it. precisionrt's layers
allow that: scales, amax histories, statistics and FLOP counters are device tensors updated in place, and an
ordinary step reads nothing. What a graph bakes in is what the layers do on that step: each layer's precision,
its statistics level (none, cheap, full) and shadow flag, train or eval, an injected channel scaling, the
shapes. ``graph_key`` is that tuple; ``GraphPlan`` decides per step:

* a step whose key has a graph replays it (the batch is copied into the graph's static input buffers first);
* a new key runs eagerly ``warmup`` times (the allocator settles, lazy state is created), then is captured;
  the capture computes nothing, so the captured step is replayed at once: every step runs exactly once;
* sampled steps (full statistics or a shadow layer: one in ``full_stats_every``) and steps with an injected
  channel scaling run eagerly, never captured: they are rare, and each would cost a graph of its own;
* a precision switch changes the key of every later step: the next ordinary steps warm up and capture the new
  precision map (the old graph stays, up to ``max_graphs``, least recently used dropped first, so a layer
  that returns to a precision replays its old graph).

The runtime's own work (``end_step``: checks, decisions, switches) runs on the host between steps, outside any
graph, as the optimizer step does. Gradients: each graph's backward writes its own ``.grad`` tensors; after a
replay they are attached to the parameters again (so ``zero_grad(set_to_none=True)`` between steps is fine).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Literal

import torch

Decision = Literal["eager", "replay", "capture"]


def graph_key(runtime) -> tuple | None:
    """What a step's graph depends on, from the runtime's layers; None for a step that must run eagerly
    (sampled statistics, a shadow layer, an injected channel scaling)."""
    key = []
    for name, layer in runtime.layers.items():
        n = layer.numerics
        if n.recording and (n.full_stats or n.shadow) or layer.channel_scale is not None \
                or layer.grad_channel_scale is not None:
            return None
        key.append((name, tuple(layer.gemm_precisions.values()), n.recording, layer.training))
    return tuple(key)


@dataclass
class GraphPlan:
    """The decisions alone (no CUDA): which steps replay, capture or run eagerly, and which graphs are kept."""
    warmup: int = 2
    max_graphs: int = 4
    seen: dict = field(default_factory=dict)          # key -> eager runs so far
    graphs: OrderedDict = field(default_factory=OrderedDict)   # key -> graph, least recently used first

    def decide(self, key: Hashable | None) -> Decision:
        if key is None:
            return "eager"
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return "replay"
        self.seen[key] = self.seen.get(key, 0) + 1
        return "eager" if self.seen[key] <= self.warmup else "capture"

    def keep(self, key: Hashable, graph) -> None:
        self.graphs[key] = graph
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)


@dataclass
class _Graph:
    graph: object
    inputs: list[torch.Tensor]
    loss: torch.Tensor
    grads: list[torch.Tensor | None]


class CapturedStep:
    """``step(*batch)`` runs ``step_fn(*batch)`` (forward and backward, returning the loss) eagerly or as a CUDA
    graph, as ``GraphPlan`` decides. Off CUDA (or with ``enabled=False``) every step is eager. ``params``: the
    parameters whose gradients the step produces."""

    def __init__(self, step_fn: Callable[..., torch.Tensor], runtime, params, warmup: int = 2, max_graphs: int = 4,
                 enabled: bool = True):
        self.step_fn, self.runtime, self.params = step_fn, runtime, list(params)
        self.plan = GraphPlan(warmup, max_graphs)
        self.enabled = enabled and torch.cuda.is_available() and all(p.is_cuda for p in self.params)
        self.decisions: list[Decision] = []   # one per step, for tests and benchmarks

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        decision = self.plan.decide(graph_key(self.runtime)) if self.enabled else "eager"
        self.decisions.append(decision)
        if decision == "eager":
            return self.step_fn(*inputs)
        key = graph_key(self.runtime)
        if decision == "capture":
            self.plan.keep(key, self._capture(inputs))
        entry = self.plan.graphs[key]
        for static, x in zip(entry.inputs, inputs):
            static.copy_(x, non_blocking=True)
        entry.graph.replay()
        for p, g in zip(self.params, entry.grads):
            p.grad = g
        return entry.loss.clone()   # the static output is overwritten by the next replay

    def _capture(self, inputs) -> _Graph:
        static = [x.clone() for x in inputs]
        for p in self.params:   # the graph's backward allocates and writes its own gradients
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()   # once per capture, never on a replayed step
        with torch.cuda.graph(graph):
            loss = self.step_fn(*static)
        return _Graph(graph, static, loss, [p.grad for p in self.params])
