"""Fault injection as configuration (contract C6): an ``[inject]`` table in any run config.

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

``ranks`` limits the injection to those global ranks (default: every rank). Channel indices are local to a
rank's shard of the layer's input (``grad_outlier``: of its output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import math

import torch

from precisionrt.config import Checked, ConfigError, Every, Range, Text
from precisionrt.layers.linear import precision_layers


FP32_MAX = 3.4028234663852886e38


@dataclass
class InjectConfig(Checked):
    kind: Literal["none", "outlier", "grad_outlier", "spike", "nonfinite"] = "none"
    layer: Annotated[str, Text('a managed layer name (checked against the model)')] = ""
    start_step: Every = 0
    ramp_steps: Every = 0
    factor: Annotated[float, Range(gt=0, le=FP32_MAX)] = 1.0
    """Up to fp32's largest finite value (the tests spike by 3e38); beyond it the scaled input is infinite."""
    channels: list[Annotated[int, Range(ge=0, lt=2**31)]] = field(default_factory=lambda: [0])
    value: Literal["nan", "inf"] = "nan"
    ranks: list[Annotated[int, Range(ge=0, lt=2**20)]] = field(default_factory=list)

    def validate(self) -> None:
        if self.kind != "none" and not self.layer:
            raise ValueError(f"layer is required for kind {self.kind!r}")
        if self.kind in ("outlier", "grad_outlier") and not self.channels:
            raise ValueError(f"channels: {self.kind} needs at least one channel")


def check_inject_ranks(cfg: InjectConfig, world_size: int) -> None:
    if cfg.kind != "none" and any(r >= world_size for r in cfg.ranks):
        raise ConfigError(f"inject.ranks {cfg.ranks} names a rank the run does not have (ranks 0..{world_size - 1})")


class FaultInjector:
    """Applies an InjectConfig to a model; call ``before_step(step)`` before each step's forward."""

    def __init__(self, config: InjectConfig, model: torch.nn.Module, rank: int = 0, names: list[str] | None = None):
        """``names``: the whole model's managed layers (``PrecisionRuntime.names``) when this rank holds only
        some of them (pipeline stages): a layer of another stage injects nothing here."""
        self.config = config
        self.active = config.kind != "none" and (not config.ranks or rank in config.ranks)
        self.layer = None
        self._poison = False
        if config.kind == "none":
            return
        layers = precision_layers(model)
        if config.layer not in layers:
            if names is not None and config.layer in names:   # another stage's layer
                self.active = False
                return
            known = names or list(layers)
            raise ConfigError(f"inject.layer {config.layer!r} is not a managed layer; e.g. {known[:3]}")
        self.layer = layers[config.layer]
        # an outlier scales input channels (weight columns); a grad_outlier output channels (weight rows)
        width = self.layer.weight.shape[0 if config.kind == "grad_outlier" else 1]
        bad = [c for c in config.channels if not 0 <= c < width]
        if config.kind in ("outlier", "grad_outlier") and (bad or not config.channels):
            what = "output" if config.kind == "grad_outlier" else "input"
            raise ConfigError(f"inject.channels {config.channels} must be {what} channel indices in [0, {width})")
        if config.kind == "nonfinite":
            self.layer.register_forward_hook(self._poison_grad_hook)

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
            scale[self.config.channels] = f
        else:
            scale.fill_(f)
        setattr(self.layer, attribute, scale)

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
