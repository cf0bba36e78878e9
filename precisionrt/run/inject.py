"""Fault injection as configuration (contract C6): an ``[inject]`` table in any run config. The faults themselves
are the runtime's drills (``precisionrt/runtime/faults.py``, ``PrecisionRuntime.drill``); this is their table.

The kinds (``outlier``, ``grad_outlier``, ``spike``, ``nonfinite``) and what each does to the layer are
described in ``precisionrt/runtime/faults.py``.

``ranks`` limits the injection to those global ranks (default: every rank). Channel indices are local to a
rank's shard of the layer's input (``grad_outlier``: of its output). ``start_step`` counts from 0 (the loop
index: ``start_step = S`` enters the step whose ``end_step`` is ``S + 1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch

from precisionrt.config import Checked, ConfigError, Every, Range, Text
from precisionrt.layers.linear import precision_layers
from precisionrt.runtime import faults


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


class FaultInjector(faults.FaultInjector):
    """Applies an InjectConfig to a model; call ``before_step(step)`` before each step's forward."""

    def __init__(self, config: InjectConfig, model: torch.nn.Module, rank: int = 0, names: list[str] | None = None):
        """``names``: the whole model's managed layers (``PrecisionRuntime.names``) when this rank holds only
        some of them (pipeline stages): a layer of another stage injects nothing here."""
        self.config = config
        self.active, self.layer, self._poison = False, None, False
        if config.kind == "none":
            return
        layers = precision_layers(model)
        fault = faults.Fault(config.kind, config.layer, config.start_step, config.ramp_steps, config.factor,
                             tuple(config.channels), config.value, tuple(config.ranks))
        super().__init__(fault, layers, names if names is not None else list(layers), rank)
