"""Fault drills: a fault put into one managed layer at chosen steps, to see the runtime find it and react.
``PrecisionRuntime.drill`` runs them from any training loop; the commands' ``[inject]`` table (contract C6,
``precisionrt/run/inject.py``) is a configuration of the same thing.

* ``outlier``: function-preserving. Input channel(s) of the layer are multiplied by a factor and the matching
  weight columns divided by it, inside the layer's forward, so exact (and BF16) arithmetic is unchanged while
  per-tensor FP8 sees a real outlier. The factor ramps from 1 at ``start_step`` to ``factor`` over
  ``ramp_steps`` and stays there (the slow outlier growth of long FP8 runs).
* ``grad_outlier``: the backward pass's counterpart, function-preserving too. Output channel(s) of the output
  gradient ``dY`` that the layer's backward GEMMs read are multiplied by the factor, rounded to a power of two,
  and the weight rows that dgrad reads and the rows of the weight gradient wgrad makes are divided by it: each
  scaling is exact in every floating-point format, so exact and BF16 arithmetic are unchanged (bit for bit),
  while the E5M2 ``dY`` carries a real outlier that flushes its other channels. The forward pass does not
  change: fprop sees nothing. Ramps like ``outlier``.
* ``spike``: the same function-preserving scaling applied to every channel, for ``max(1, ramp_steps)`` steps
  from ``start_step``: a burst that a delayed-scaling history has not seen.
* ``nonfinite``: one element of the layer's output gradient becomes NaN (or ``inf``), for
  ``max(1, ramp_steps)`` steps from ``start_step`` (like a spike: one step unless said otherwise).

``ranks`` limits the fault to those global ranks (default: every rank). Channel indices are local to a rank's
shard of the layer's input (``grad_outlier``: of its output). A layer is named by its global name: under pipeline
parallelism a rank that does not hold it injects nothing.

``FaultInjector.before_step(step)`` takes the step counted from 0 (the commands' loop index); the runtime's drill
counts as ``end_step`` does, from 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from precisionrt.config import ConfigError

FAULT_KINDS = ("outlier", "grad_outlier", "spike", "nonfinite")


@dataclass(frozen=True)
class Fault:
    kind: str
    layer: str
    start_step: int
    """Counted from 0: the loop index of the first step it enters."""
    ramp_steps: int = 0
    factor: float = 1.0
    channels: tuple[int, ...] = (0,)
    value: str = "nan"
    ranks: tuple[int, ...] = ()


class FaultInjector:
    """Puts ``fault`` into this rank's copy of its layer; call ``before_step(step)`` before each step's forward.

    ``layers``: this rank's managed layers by global name; ``names``: the whole model's (a layer of another
    pipeline stage injects nothing here). ``what`` prefixes the errors (``inject.`` for the config table)."""

    def __init__(self, fault: Fault, layers: dict, names: list[str], rank: int = 0, what: str = "inject."):
        self.config = fault
        if fault.kind not in FAULT_KINDS:
            raise ConfigError(f"{what}kind {fault.kind!r} is not a fault kind: one of {FAULT_KINDS}")
        if fault.value not in ("nan", "inf"):
            raise ConfigError(f"{what}value {fault.value!r}: 'nan' or 'inf'")
        if fault.start_step < 0 or fault.ramp_steps < 0 or not 0 < fault.factor < math.inf:
            raise ConfigError(f"{what}start_step and ramp_steps must be >= 0 and factor finite and > 0, got "
                              f"{fault.start_step}, {fault.ramp_steps}, {fault.factor}")
        self.active = not fault.ranks or rank in fault.ranks
        self.layer = None
        self._poison = False
        if fault.layer not in layers:
            if fault.layer in names:   # another stage's layer
                self.active = False
                return
            raise ConfigError(f"{what}layer {fault.layer!r} is not a managed layer; e.g. {list(names)[:3]}")
        self.layer = layers[fault.layer]
        # an outlier scales input channels (weight columns); a grad_outlier output channels (weight rows)
        width = self.layer.weight.shape[0 if fault.kind == "grad_outlier" else 1]
        bad = [c for c in fault.channels if not 0 <= c < width]
        if fault.kind in ("outlier", "grad_outlier") and (bad or not fault.channels):
            side = "output" if fault.kind == "grad_outlier" else "input"
            raise ConfigError(f"{what}channels {list(fault.channels)} must be {side} channel indices in [0, {width})")
        self._hook = None
        if fault.kind == "nonfinite":
            self._hook = self.layer.register_forward_hook(self._poison_grad_hook)

    def factor_at(self, step: int) -> float:
        c = self.config
        if step < c.start_step:
            return 1.0
        if c.kind == "spike":
            return c.factor if step < c.start_step + max(1, c.ramp_steps) else 1.0
        if c.ramp_steps == 0:
            return c.factor
        progress = min(1.0, (step - c.start_step + 1) / c.ramp_steps)
        return 1.0 + (c.factor - 1.0) * progress

    def before_step(self, step: int) -> None:
        if not self.active:
            return
        kind = self.config.kind
        if kind == "nonfinite":
            self._poison = self.config.start_step <= step < self.config.start_step + max(1, self.config.ramp_steps)
            return
        f = self.factor_at(step)
        if kind == "grad_outlier":   # a power of two: dividing it back out is exact in any format
            f = 2.0 ** round(math.log2(f))
        attribute = "grad_channel_scale" if kind == "grad_outlier" else "channel_scale"
        if f == 1.0:
            setattr(self.layer, attribute, None)
            return
        w = self.layer.weight
        scale = torch.ones(w.shape[0 if kind == "grad_outlier" else 1], dtype=w.dtype, device=w.device)
        if kind in ("outlier", "grad_outlier"):
            scale[list(self.config.channels)] = f
        else:
            scale.fill_(f)
        setattr(self.layer, attribute, scale)

    def remove(self) -> None:
        """Take the fault out of the layer."""
        if self.layer is not None:
            self.layer.channel_scale = self.layer.grad_channel_scale = None
            if self._hook is not None:
                self._hook.remove()
        self.active, self._poison = False, False

    def _poison_grad_hook(self, module, inputs, output):
        if not (self._poison and module.training):
            return
        bad = float(self.config.value)

        def poison(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad.view(-1)[0] = bad
            return grad

        out = output[0] if isinstance(output, tuple) else output
        out.register_hook(poison)
