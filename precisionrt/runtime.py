"""PrecisionRuntime (contract C2): owns the managed layers' precisions, their FLOP accounting, the switch log
and the runtime's checkpoint state.

    rt = PrecisionRuntime(model, RuntimeConfig(mode="fp8"), run_dir="runs/x")
    for step in ...:
        loss.backward(); optimizer.step()
        rt.end_step(step)          # decisions apply before the next forward
    rt.close(step)

Modes: ``fp8`` (every FP8-capable layer in FP8), ``bf16`` (all in BF16), ``dynamic`` (start in FP8; monitors
and policy promote/demote; see monitors.py and policy.py). Pins (fnmatch patterns over layer names) hold
layers in one precision whatever the mode.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from precisionrt.events import EventLog, SwitchEvent
from precisionrt.fp8 import ScalingConfig
from precisionrt.linear import LayerNumerics, precision_layers
from precisionrt.megatron import match_layers

EVENTS_FILE = "precision_events.jsonl"


@dataclass
class RuntimeConfig:
    mode: Literal["dynamic", "fp8", "bf16"] = "fp8"
    pin_bf16: list[str] = field(default_factory=list)   # fnmatch patterns over managed layer names
    pin_fp8: list[str] = field(default_factory=list)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


class PrecisionRuntime:
    def __init__(self, model: torch.nn.Module, config: RuntimeConfig, run_dir: str | Path | None = None,
                 run_config: dict | None = None, rank: int = 0):
        if config.mode == "dynamic":
            raise NotImplementedError("precision.mode = 'dynamic' needs the monitors and policy, which are not "
                                      "built yet; use 'fp8' or 'bf16'")
        self.config = config
        self.layers = precision_layers(model)
        if not self.layers:
            raise ValueError("model has no PrecisionLinear layers: build it with precisionrt.megatron.precision_layer_spec")
        for layer in self.layers.values():
            layer.numerics = LayerNumerics(config.scaling, layer.weight.device)
        self.pinned: dict[str, str] = {}
        for name in match_layers(model, config.pin_bf16, "precision.pin_bf16 pattern"):
            self.pinned[name] = "bf16"
        for name in match_layers(model, config.pin_fp8, "precision.pin_fp8 pattern"):
            if self.pinned.get(name) == "bf16":
                raise ValueError(f"layer {name!r} is pinned to both bf16 and fp8")
            if not self.layers[name].fp8_capable:
                raise ValueError(f"layer {name!r} is pinned to fp8 but {self.layers[name].fp8_unsupported_reason}")
            self.pinned[name] = "fp8"
        initial = "bf16" if config.mode == "bf16" else "fp8"
        for name, layer in self.layers.items():
            want = self.pinned.get(name, initial)
            layer.precision = want if layer.fp8_capable else "bf16"
        self._flops_at_last_step = self._flop_totals()
        self._step_fraction = self.fp8_flop_fraction()
        self.run_id = uuid.uuid4().hex[:12]
        self.events: EventLog | None = None
        if run_dir is not None:
            self.start_log(run_dir, run_config, rank)

    def start_log(self, run_dir: str | Path, run_config: dict | None = None, rank: int = 0) -> None:
        """Open the switch log in ``run_dir`` (rank 0 writes) and record run_start with the layer table."""
        self.events = EventLog(Path(run_dir) / EVENTS_FILE, self.run_id, enabled=rank == 0)
        self.events.run_start(self.layer_table(), run_config or {"precision": asdict(self.config)})

    # ------------------------------------------------------------------------------------------ queries

    def precisions(self) -> dict[str, str]:
        return {name: layer.precision for name, layer in self.layers.items()}

    def layer_table(self) -> list[dict]:
        """The run_start layer table: name, index, GEMM FLOPs per token, initial precision, pin, fallback."""
        return [
            {"name": name, "index": i, "gemm_flops_per_token": layer.gemm_flops_per_token,
             "precision": layer.precision, "pinned": self.pinned.get(name),
             "fp8_unsupported": layer.fp8_unsupported_reason}
            for i, (name, layer) in enumerate(self.layers.items())
        ]

    def _flop_totals(self) -> tuple[int, int]:
        return (sum(l.flops.fp8 for l in self.layers.values()), sum(l.flops.bf16 for l in self.layers.values()))

    def fp8_flop_fraction(self, window: Literal["run", "step"] = "run") -> float:
        """Share of the managed layers' GEMM FLOPs that ran in FP8, over the run or over the last step.

        Counted from tensor shapes on the host. Attention score GEMMs, the embedding and the output head are
        not managed layers and are not in the denominator. Before any forward: the share of FLOPs per token
        currently assigned to FP8.
        """
        if window == "step":
            return self._step_fraction
        fp8, bf16 = self._flop_totals()
        if fp8 + bf16 == 0:
            per_token = {n: l.gemm_flops_per_token for n, l in self.layers.items()}
            total = sum(per_token.values())
            return sum(f for n, f in per_token.items() if self.layers[n].precision == "fp8") / total
        return fp8 / (fp8 + bf16)

    # ---------------------------------------------------------------------------------------- changes

    def set_precision(self, name: str, precision: str, reason: str = "manual", step: int = -1,
                      signals: dict | None = None) -> SwitchEvent | None:
        """Switch one layer (effective from its next forward) and log it. Returns the event, or None if the
        layer already runs at ``precision``. Unknown layers and impossible requests raise ValueError."""
        if name not in self.layers:
            raise ValueError(f"unknown layer {name!r}; managed layers: {list(self.layers)[:4]} ...")
        layer = self.layers[name]
        if layer.precision == precision:
            return None
        if reason == "manual" and name in self.pinned and self.pinned[name] != precision:
            raise ValueError(f"layer {name!r} is pinned to {self.pinned[name]}")
        event = SwitchEvent(step=step, layer=name, from_=layer.precision, to=precision, reason=reason,
                            signals=signals or {})
        layer.precision = precision  # validates; resets scaling state on a return to fp8
        if self.events is not None:
            self.events.switch(event)
        return event

    def end_step(self, step: int) -> list[SwitchEvent]:
        """Close optimizer step ``step``: account FLOPs; in dynamic mode, monitor and decide."""
        totals = self._flop_totals()
        d_fp8, d_bf16 = (t - p for t, p in zip(totals, self._flops_at_last_step))
        self._step_fraction = d_fp8 / (d_fp8 + d_bf16) if d_fp8 + d_bf16 else self._step_fraction
        self._flops_at_last_step = totals
        for layer in self.layers.values():
            layer.numerics.drain_stats()  # static modes keep no stats window
        return []

    def close(self, step: int) -> None:
        if self.events is not None:
            self.events.run_end(step)
            self.events.close()

    # ------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        return {
            "precisions": self.precisions(),
            "numerics": {n: l.numerics.state_dict() for n, l in self.layers.items()},
            "flops": {n: [l.flops.fp8, l.flops.bf16] for n, l in self.layers.items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        missing = set(self.layers) - set(sd["precisions"])
        unknown = set(sd["precisions"]) - set(self.layers)
        if missing or unknown:
            raise ValueError(f"runtime state does not match the model: missing {sorted(missing)[:3]}, "
                             f"unknown {sorted(unknown)[:3]}")
        for name, layer in self.layers.items():
            layer.precision = sd["precisions"][name]
            layer.numerics.load_state_dict(sd["numerics"][name])
            layer.flops.fp8, layer.flops.bf16 = sd["flops"][name]
        self._flops_at_last_step = self._flop_totals()

