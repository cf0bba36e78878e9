"""PrecisionRuntime (contract C2): the wiring of managed layers, monitors, policy, switch log, FLOP accounting
(``flops.py``), sampling schedule (``sampling.py``), nonfinite step skipping (``skips.py``) and operator
control (``control.py``), and the runtime's checkpoint state.

    rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic"), run_dir="runs/x")
    for step in ...:
        loss.backward()
        grad_norm = clip_grad_norm_(...)
        if not rt.should_skip_step(grad_norm):
            optimizer.step()
        optimizer.zero_grad()
        rt.end_step(step)          # decisions apply before the next forward
    rt.close(step)

Modes: ``fp8`` (every FP8-capable layer in FP8), ``bf16`` (all BF16), ``dynamic`` (start in FP8; monitors
and policy promote and demote). Pins (fnmatch patterns over layer names, or ``layer:gemm`` for one GEMM) hold
layers or GEMMs whatever the mode.

Precision is per GEMM (``fprop``, ``dgrad``, ``wgrad``: ``gemm_precisions()``); ``precisions()`` gives each layer's
``"fp8"``/``"bf16"``, or ``"mixed"`` when its GEMMs differ. The policy decides per GEMM
(``policy.granularity = "gemm"``: a unit is ``layer:gemm``, its signals those of the operands the GEMM reads) or
per layer (``"layer"``: a unit is the layer and moves its three GEMMs together). A name given to
``set_precision``, ``promote``, ``release``, pins and the control file is a layer (all its GEMMs) or
``layer:gemm``.

Host synchronisation: ``end_step`` transfers nothing on ordinary steps; on a check step (every
``monitor.check_interval`` steps) it makes one packed all-reduce and one device->host copy, whatever the number
of layers. ``should_skip_step`` costs one scalar transfer per step (as Megatron's grad-norm check does) and is
optional.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch

from precisionrt.runtime import monitors
from precisionrt.config import Checked, ConfigError, LayerPattern, Range, Text
from precisionrt.runtime.control import OperatorControl
from precisionrt.runtime.faults import Fault, FaultInjector
from precisionrt.observe.events import (EVENTS_FILE, GEMMS, MIXED, PRECISIONS, EventLog, Precision, Reason, SwitchEvent,
                                       json_safe, layer_precision, read_log)
from precisionrt.runtime.flops import FlopAccounting
from precisionrt.numerics.fp8 import ScalingConfig
from precisionrt.runtime.layer_table import LayerTable
from precisionrt.distributed.groups import check_parallelism, pipeline_group, tensor_parallel_group
from precisionrt.layers.linear import precision_layers
from precisionrt.layers.names import match_gemms, split_gemm
from precisionrt.runtime.monitors import MonitorConfig, MonitorState
from precisionrt.numerics.state import LayerNumerics
from precisionrt.runtime.policy import Policy, PolicyConfig, worst_state
from precisionrt.runtime.sampling import SamplingSchedule
from precisionrt.runtime.skips import NonfiniteSkips
from precisionrt.runtime.speed_plan import SpeedPlan, make_plan

log = logging.getLogger(__name__)


@dataclass
class RuntimeConfig(Checked):
    mode: Literal["dynamic", "fp8", "bf16"] = "dynamic"
    pin_bf16: list[LayerPattern] = field(default_factory=list)
    """Fnmatch patterns over managed layer names."""
    pin_fp8: list[LayerPattern] = field(default_factory=list)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    observe: bool = False
    """Static modes: run the monitors and log stats, decide nothing."""
    control_file: Annotated[str, Text('a file name or path, relative to the run directory ("": no operator control)')] = "precision_control.json"
    """In the run dir; "" disables operator control."""
    skip_nonfinite_steps: bool = True
    plan: Literal["stability", "speed"] = "stability"
    """``stability``: every FP8-capable GEMM starts in FP8 and the policy decides. ``speed``: FP8 only for the GEMMs
    the speed table measured faster in FP8 (``speed_table``); the others are pinned BF16 (``speed_plan.py``)."""
    speed_table: Annotated[str, Text("a speed table's path ('' for none)", pattern=r"[^\n]*")] = ""
    """A table made by ``python -m precisionrt.speed`` on this device, for ``plan = "speed"``."""
    speed_margin: Annotated[float, Range(ge=0, lt=1)] = 0.05
    """``plan = "speed"``: FP8 must beat BF16 by this share of BF16's time."""
    fused_kernels: bool = True
    """CUDA: fused quantization kernels (False: the eager reference path)"""


def _default_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _agreed_run_id() -> str:
    """A new run id, rank 0's on every rank: the checkpoint's common state (``sharded_state_dict``) holds it and
    megatron's ``dist_checkpointing`` expects that state equal on all ranks."""
    run_id = [uuid.uuid4().hex[:12]]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(run_id, src=0)
    return run_id[0]


class PrecisionRuntime:
    def __init__(self, model: torch.nn.Module | list[torch.nn.Module], config: RuntimeConfig,
                 run_dir: str | Path | None = None, run_config: dict | None = None, rank: int | None = None):
        """``model``: this rank's model, or the list of its model chunks under virtual pipelining. ``rank``
        defaults to this process's rank in ``torch.distributed`` (0 when it is not initialised): rank 0 writes
        the switch log and reads the control file.

        Under model parallelism ``layers`` holds this rank's layers and ``names`` the whole model's, by global
        name (``layout.py``); construction then makes one ``all_gather_object`` over the world, so every rank
        constructs its runtime."""
        self.config = config
        check_parallelism()
        rank = _default_rank() if rank is None else rank
        self.layers = precision_layers(model)   # this rank's
        self.table = LayerTable.gather(self.layers)
        if not self.table.names:
            raise ValueError("model has no PrecisionLinear layers: build it from a layer spec converted by "
                             "precisionrt.convert_layer_spec, e.g. GPTModel(config, convert_layer_spec("
                             "get_gpt_layer_local_spec()), ...), then give that model to PrecisionRuntime")
        self.names = self.table.names            # the whole model's, in forward order
        chunks = model if isinstance(model, (list, tuple)) else [model]
        self.device = next(p for chunk in chunks for p in chunk.parameters()).device
        self._rows = self.table.rows_of(list(self.layers), self.device)
        for layer in self.layers.values():
            layer.numerics = LayerNumerics(config.scaling, layer.weight.device)
            layer.numerics.fused = config.fused_kernels
        # Delayed scaling under tensor parallelism: every rank quantizes a shard of the same logical tensor, so
        # the amax histories are reduced across the TP group (one collective per step, in end_step), as
        # Transformer Engine does; otherwise each rank would scale its shard differently.
        self._tp_group = tensor_parallel_group()
        if config.scaling.recipe == "delayed" and self._tp_group is not None:
            for layer in self.layers.values():
                for state in layer.numerics.scaling.values():
                    state.defer = True
        info = self.table.by_name
        # Pins per GEMM, ``{(layer, gemm): precision}``; a layer that cannot run FP8 is, for the policy, pinned.
        self.pinned: dict[tuple[str, str], str] = {}
        for key in match_gemms(self.names, config.pin_bf16, "precision.pin_bf16 pattern"):
            self.pinned[key] = "bf16"
        for key in match_gemms(self.names, config.pin_fp8, "precision.pin_fp8 pattern"):
            if self.pinned.get(key) == "bf16":
                raise ValueError(f"{key[0]}:{key[1]} is pinned to both bf16 and fp8")
            if not info[key[0]].fp8_capable:
                raise ValueError(f"layer {key[0]!r} is pinned to fp8 but {info[key[0]].fp8_unsupported}")
            self.pinned[key] = "fp8"
        self.pin_reasons = dict.fromkeys(self.pinned, "config")
        self.speed_plan: SpeedPlan | None = None
        if config.plan == "speed":
            if not config.speed_table:
                raise ConfigError('precision.plan = "speed" needs precision.speed_table: a table measured on this '
                                  "device by python -m precisionrt.speed --config FILE --out TABLE.json")
            self.speed_plan = make_plan(config.speed_table, {n: i.shape for n, i in info.items()},
                                        {n: i.fp8_capable for n, i in info.items()}, self.device, config.speed_margin)
            for key, precision in self.speed_plan.pins().items():
                if key not in self.pinned:   # a pin the configuration states wins
                    self.pinned[key], self.pin_reasons[key] = precision, "speed"
        initial = "bf16" if config.mode == "bf16" else "fp8"
        stuck = {n: i.fp8_unsupported for n, i in info.items() if not i.fp8_capable}
        if stuck and config.mode != "bf16" and rank == 0:   # a run silently 60% FP8 instead of 100% must say so
            log.warning("%d of %d managed layers cannot run FP8 and stay BF16: %s", len(stuck), len(self.names),
                        "; ".join(f"{n} ({why})" for n, why in stuck.items()))
        # the GEMM precisions of each layer another rank holds (every rank follows every layer's decisions)
        self._remote: dict[str, dict[str, str]] = {}
        for name in self.names:
            self._assign(name, {g: self.pinned.get((name, g), initial) if info[name].fp8_capable else "bf16"
                                for g in GEMMS})
        self._fixed = {**{(n, g): "bf16" for n, i in info.items() if not i.fp8_capable for g in GEMMS},
                       **self.pinned}
        self.granularity = config.policy.granularity
        units = {u: self._unit_gemms(u) for u in self._units()}
        self.policy = Policy(config.policy, list(units),
                             {u: self._fixed[gemms[0]] for u, gemms in units.items() if self._unit_pinned(u)},
                             {u: self._unit_precision(u) for u in units})
        self.monitor_state = MonitorState()
        monitoring = config.mode == "dynamic" or config.observe
        for layer in self.layers.values():
            layer.numerics.collect = monitoring
        self.last_signals: dict[str, dict] = {}
        self.rank = rank
        self.flops = FlopAccounting(self.layers, pipeline_group(), self.device)
        self.sampling = SamplingSchedule(self.layers, config.monitor, monitoring)
        self.skips = NonfiniteSkips(config.skip_nonfinite_steps)
        self.control = OperatorControl(self.names)   # reads a file once the run directory is known
        self._last_step = 0
        self.run_dir: Path | None = None
        self.run_id = _agreed_run_id()
        self.events: EventLog | None = None
        self._run_config: dict | None = None
        self._resumed_from: int | None = None   # the step of the checkpoint this run continues from
        self._resumed_from_given = False         # by start_log, which wins over the loaded checkpoint's step
        self._drills: list[FaultInjector] = []
        if run_dir is not None:
            self.start_log(run_dir, run_config, rank)
        self.sampling.plan(1)

    def start_log(self, run_dir: str | Path, run_config: dict | None = None, rank: int | None = None,
                  resumed_from: int | None = None) -> None:
        """Open the switch log in ``run_dir`` (rank 0 writes). Its run_start record (run id, layer table) is written
        with the first record after it (the first ``end_step``'s, a switch, or ``close``), so that a checkpoint
        loaded in between (``load_state_dict``, ``load_sharded_state_dict``) is in it: the loaded run id, the
        loaded precisions, and ``resumed_from`` (the checkpoint's step; ``resumed_from`` given here wins). A resumed
        run appends to the existing log; its unreadable lines are counted and reported, not fatal."""
        rank = _default_rank() if rank is None else rank
        self.run_dir, self.rank = Path(run_dir), rank
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if rank == 0 and self.config.control_file:
            self.control.open(self.run_dir / self.config.control_file)
        if resumed_from is not None:
            self._resumed_from, self._resumed_from_given = resumed_from, True
        self._run_config = run_config
        self.events = EventLog(self.run_dir / EVENTS_FILE, self.run_id, enabled=rank == 0)
        self.events.defer_start(self._run_start)

    def _run_start(self) -> dict:
        """The run_start record's fields, made when it is written (``EventLog.defer_start``)."""
        path = self.events.path
        if self._resumed_from is not None and path.exists():
            existing = read_log(path)
            if existing.skipped_lines:
                log.warning("precisionrt: %s: %d unreadable line(s) skipped, e.g. %s", path,
                            existing.skipped_lines, existing.skipped_examples[0])
        return {"layers": self.layer_table(), "config": self._run_config or {"precision": asdict(self.config)},
                "resumed_from": self._resumed_from}

    # ------------------------------------------------------------------------------------------ queries

    def precisions(self) -> dict[str, str]:
        """Every layer of the model (this rank's and the other ranks') -> ``"fp8"`` or ``"bf16"`` when its three
        GEMMs agree, else ``"mixed"``."""
        return {name: layer_precision(self._gemms_of(name)) for name in self.names}

    def gemm_precisions(self) -> dict[str, dict[str, str]]:
        """Every layer -> ``{"fprop": p, "dgrad": p, "wgrad": p}``."""
        return {name: dict(self._gemms_of(name)) for name in self.names}

    def forward_precisions(self) -> dict[str, str]:
        """Every layer -> the precision of its forward GEMM (fprop): what inference runs (``rollout.precision =
        "follow"``, the FP8 export)."""
        return {name: self._gemms_of(name)["fprop"] for name in self.names}

    def _gemms_of(self, name: str) -> dict[str, str]:
        return self.layers[name].gemm_precisions if name in self.layers else self._remote[name]

    def _assign(self, name: str, precisions: dict[str, str]) -> None:
        """Set some GEMMs of ``name`` (``{gemm: precision}``)."""
        if name in self.layers:
            self.layers[name].set_gemm_precisions(precisions)   # validates; fresh scaling for a returning operand
        else:
            self._remote[name] = {**self._remote.get(name, {}), **precisions}

    # units: what the policy decides on (a layer, or one GEMM of a layer: ``policy.granularity``)

    def _units(self) -> list[str]:
        return list(self.names) if self.granularity == "layer" else [f"{n}:{g}" for n in self.names for g in GEMMS]

    def _unit_of(self, layer: str, gemm: str) -> str:
        return layer if self.granularity == "layer" else f"{layer}:{gemm}"

    def _unit_gemms(self, unit: str) -> list[tuple[str, str]]:
        layer, gemm = split_gemm(unit)
        return [(layer, g) for g in ((gemm,) if gemm else GEMMS)]

    def _free_gemms(self, unit: str) -> list[tuple[str, str]]:
        """The GEMMs of ``unit`` that the policy moves: all but the pinned ones (and those of a layer that cannot
        run FP8)."""
        return [k for k in self._unit_gemms(unit) if k not in self._fixed]

    def _unit_pinned(self, unit: str) -> bool:
        return not self._free_gemms(unit)

    def _unit_precision(self, unit: str) -> str:
        gemms = self._free_gemms(unit) or self._unit_gemms(unit)
        return self._gemms_of(gemms[0][0])[gemms[0][1]]

    def layer_table(self) -> list[dict]:
        """The run_start layer table, of the whole model in forward order: name, index, GEMM FLOPs per token
        (of one tensor-parallel shard, all three GEMMs), initial precision and per-GEMM precisions, pins (a layer
        pinned whole: ``pinned``; per GEMM: ``gemm_pins``, ``{gemm: precision}``, and why, ``pin_reasons``:
        ``config`` or ``speed``), fallback."""
        table = []
        for index, i in enumerate(self.table.infos):
            pins = {g: self.pinned[(i.name, g)] for g in GEMMS if (i.name, g) in self.pinned}
            whole = pins.get("fprop") if len(pins) == 3 and len(set(pins.values())) == 1 else None
            table.append({"name": i.name, "index": index, "gemm_flops_per_token": i.gemm_flops_per_token,
                          "precision": layer_precision(self._gemms_of(i.name)), "gemms": dict(self._gemms_of(i.name)),
                          "pinned": whole, "gemm_pins": pins,
                          "pin_reasons": {g: self.pin_reasons[(i.name, g)] for g in pins},
                          "fp8_unsupported": i.fp8_unsupported})
        return table

    @property
    def last_step(self) -> int:
        """The step the last ``end_step`` closed (0 before the first; restored by ``load_state_dict``)."""
        return self._last_step

    @property
    def monitoring(self) -> bool:
        """Whether the monitors run (dynamic mode, or ``observe``); the sampling schedule follows it."""
        return self.sampling.monitoring

    @monitoring.setter
    def monitoring(self, on: bool) -> None:
        self.sampling.monitoring = on

    def fp8_flop_fraction(self, window: Literal["run", "step"] = "run") -> float:
        """Share of the managed layers' GEMM FLOPs that ran in FP8, over the run or the last step (``flops.py``;
        under pipeline parallelism a collective over the pipeline group)."""
        return self.flops.fraction(window)

    @property
    def control_rejected(self) -> list[str]:
        """Operator control entries rejected so far, each with its reason."""
        return self.control.rejected

    def metrics(self) -> dict:
        """Run-level metrics, the worst layer per signal, and (after a check) per-layer metrics
        (``precision/<layer>/<signal>``, ``precision/<layer>/fp8_gemms``: how many of its GEMMs run FP8; a W&B
        logger shows those of ``wandb.layer_panels`` only). Under pipeline parallelism a collective over the
        pipeline group (the FLOP shares)."""
        run, step = self.flops.fractions()
        gemms = self.gemm_precisions()
        out = {"precision/fp8_flop_fraction": run, "precision/fp8_flop_fraction_step": step,
               "precision/bf16_layers": sum(all(p == "bf16" for p in g.values()) for g in gemms.values()),
               "precision/mixed_layers": sum(layer_precision(g) == MIXED for g in gemms.values()),
               "precision/bf16_gemms": sum(p == "bf16" for g in gemms.values() for p in g.values()),
               **monitors.worst(self.last_signals, self.names)}
        for name, sig in self.last_signals.items():
            out[f"precision/{name}/is_fp8"] = int(layer_precision(gemms[name]) == "fp8")
            out[f"precision/{name}/fp8_gemms"] = sum(p == "fp8" for p in gemms[name].values())
            out.update({f"precision/{name}/{k}": v for k, v in sig.items() if isinstance(v, float)})
        return out

    # ---------------------------------------------------------------------------------------- changes

    def _resolve(self, name: str) -> tuple[str, list[str]]:
        """A layer name (all its GEMMs) or ``layer:gemm``; an unknown layer or GEMM is a ValueError naming it."""
        layer, gemm = split_gemm(name)
        if layer not in self.table.by_name:
            raise ValueError(f"unknown layer {layer!r}; managed layers: {self.names[:4]} ... ({len(self.names)})")
        return layer, [gemm] if gemm else list(GEMMS)

    def set_precision(self, name: str, precision: Precision, reason: Reason = "manual", step: int = -1,
                      signals: dict | None = None) -> list[SwitchEvent]:
        """Switch a layer's GEMMs (``name``: a layer, or ``layer:gemm`` for one), effective from the next forward,
        and log each GEMM that changes. Returns those events (empty if every GEMM already runs ``precision``). A
        manual switch holds what it switched there until ``release``. Unknown names and impossible requests
        raise ValueError."""
        layer, gemms = self._resolve(name)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if reason == "manual":
            info = self.table.by_name[layer]
            for g in gemms:
                if self.pinned.get((layer, g), precision) != precision:
                    raise ValueError(f"{layer}:{g} is pinned to {self.pinned[(layer, g)]}")
            if precision == "fp8" and not info.fp8_capable:
                raise ValueError(f"layer {layer!r} cannot run fp8: {info.fp8_unsupported}")
            for unit in dict.fromkeys(self._unit_of(layer, g) for g in gemms):
                self.policy.hold(unit, precision)
        return self._switch(layer, gemms, precision, reason, step, signals)

    def _switch(self, layer: str, gemms: list[str], precision: Precision, reason: Reason, step: int,
                signals: dict | None) -> list[SwitchEvent]:
        current = self._gemms_of(layer)
        safe = {k: json_safe(v) for k, v in (signals or {}).items() if k != "gemms"}
        events = [SwitchEvent(step=step, layer=layer, gemm=g, from_=current[g], to=precision, reason=reason,
                              signals=safe) for g in gemms if current[g] != precision]
        if self.events is not None and events:
            self.events.begin()   # run_start's layer table holds the precisions from before this switch
        self._assign(layer, {e.gemm: precision for e in events})
        if self.events is not None:
            for e in events:
                self.events.switch(e)
        return events

    def promote(self, name: str, reason: Reason, step: int, severity: float = 1.0,
                signals: dict | None = None) -> list[SwitchEvent]:
        """Promote ``name`` (a layer, or ``layer:gemm``) to BF16 on a signal from outside the monitors (RL:
        ``reason="mismatch"``, for the forward GEMM). Unlike a manual switch it holds nothing: the policy brings
        it back as any promoted unit (cooldown, pre-flight, probation). Empty when the policy keeps it where it is
        (pinned, held, already BF16). Dynamic mode only."""
        layer, gemms = self._resolve(name)
        if self.config.mode != "dynamic":
            raise ValueError(f"promote needs precision mode 'dynamic' (a policy to bring the layer back), "
                             f"not {self.config.mode!r}")
        events = []
        for unit in dict.fromkeys(self._unit_of(layer, g) for g in gemms):
            if self.policy.promote(unit, severity):
                events += self._switch(layer, [g for _, g in self._free_gemms(unit)], "bf16", reason, step, signals)
        return events

    def release(self, name: str) -> None:
        """End a manual hold (``name``: a layer or ``layer:gemm``): the policy decides for it again."""
        layer, gemms = self._resolve(name)
        for unit in dict.fromkeys(self._unit_of(layer, g) for g in gemms):
            self.policy.hold(unit, None)

    def drill(self, kind: Literal["outlier", "grad_outlier", "spike", "nonfinite"], layer: str, start_step: int,
              ramp_steps: int = 0, factor: float = 1.0, channels: tuple[int, ...] | list[int] = (0,),
              value: Literal["nan", "inf"] = "nan", ranks: tuple[int, ...] | list[int] = ()) -> FaultInjector:
        """A fault drill from any training loop: what the commands' ``[inject]`` table does (``runtime/faults.py``:
        ``outlier``, ``grad_outlier``, ``spike``, ``nonfinite``), put into ``layer`` (a global name; under pipeline
        parallelism the ranks that do not hold it inject nothing) by the runtime itself: from step ``start_step``
        (counted as ``end_step`` counts, from 1: the fault enters the forward and backward of the step that
        ``end_step(start_step)`` closes), ramping over ``ramp_steps``, on ``ranks`` (global ranks; default all).
        Call it on every rank, before the first step of the drill; the runtime applies it at each ``end_step``
        and after a checkpoint is loaded. Returns the injector (``remove()`` ends the drill)."""
        if start_step < 1:
            raise ValueError(f"drill start_step {start_step}: steps count from 1, as end_step counts")
        fault = Fault(kind, layer, start_step - 1, ramp_steps, factor, tuple(channels), value, tuple(ranks))
        injector = FaultInjector(fault, self.layers, self.names, self.rank, what="drill ")
        injector.before_step(self._last_step)   # the next step, if the drill starts there
        self._drills.append(injector)
        return injector

    def should_skip_step(self, grad_norm: torch.Tensor | float) -> bool:
        """True when the gradients are not finite on any rank: skip the optimizer step. The next ``end_step``
        then checks at once, so the layer where NaN/Inf entered is promoted before the next forward.
        ``grad_norm``: a tensor (``clip_grad_norm_``'s) or a float (megatron's optimizer returns one)."""
        if grad_norm is None:
            raise ValueError("should_skip_step: grad_norm is None (megatron's optimizer.step() returns None when its "
                             "grad scaler found inf/NaN and it skipped the update itself): pass the norm of "
                             "precisionrt.clip_grad_norm_(model, max_norm), computed before optimizer.step()")
        return self.skips.check(torch.as_tensor(grad_norm))

    def skip_on_device(self, grad_norm: torch.Tensor, optimizer: torch.optim.Optimizer, step: int) -> None:
        """``should_skip_step`` without a host synchronisation, for CUDA: the nonfinite flag goes to a fused
        Adam/AdamW as ``optimizer.found_inf``, which skips the update on the device. The skipped steps are
        learnt at the next check (``take_skipped``), where the layer where NaN/Inf entered is promoted."""
        self.skips.on_device(grad_norm, optimizer, step)

    def optimizer_step(self, optimizer, grad_norm: torch.Tensor | float, step: int) -> bool:
        """The skip-aware optimizer step, then ``zero_grad``: every training loop's one call after clipping.

        An optimizer that skips on the device (a fused Adam/AdamW: ``found_inf``) always steps, with the
        nonfinite flag handed over (``skip_on_device``: no host synchronisation; the skip is learnt at the next
        ``fetch`` or check, see ``take_skipped``). Any other optimizer steps only if ``should_skip_step`` (one
        read) says the gradients are finite. Megatron's optimizers (``get_megatron_optimizer``) are of the second
        kind: they apply an update with NaN gradients unless a grad scaler is set, so the decision is made here,
        before their ``step()``; a ``step()`` that still reports ``update_successful = False`` (its grad scaler
        found inf/NaN) counts as skipped here too. Returns True when the step was skipped."""
        skipped = False
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            self.skip_on_device(grad_norm, optimizer, step)
            optimizer.step()
        elif self.should_skip_step(grad_norm):
            skipped = True
        else:
            result = optimizer.step()
            # megatron's (update_successful, grad_norm, num_zeros_in_grad)
            if isinstance(result, tuple) and result and result[0] is False:
                skipped = self.skips.enabled
                self.skips.check_next |= skipped
        optimizer.zero_grad(set_to_none=True)
        return skipped

    def fetch(self, values: torch.Tensor):
        """``values`` (a device tensor) on the host, as a numpy array, in one device->host transfer together
        with the skip flags that ``skip_on_device`` left on the device: a training loop's one transfer per step
        for its own metrics. The skips it learns are in ``take_skipped``, and the next ``end_step`` then checks
        at once, as after ``should_skip_step``."""
        return self.skips.fetch(values, check_after_skip=True)

    def take_skipped(self, flush: bool = False) -> list[int]:
        """Steps skipped on the device that the last check learnt of; clears them. ``flush`` fetches the flags
        not yet fetched first (one transfer: at the end of a run)."""
        return self.skips.take(flush)

    def end_step(self, step: int) -> list[SwitchEvent]:
        """Close optimizer step ``step`` (counted from 1, as metrics count): account FLOPs; on check steps
        (``step % monitor.check_interval == 0``, or at once after a skipped nonfinite step) monitor, decide and
        apply. Returns the switches made; they take effect at the next forward."""
        self._last_step = step
        for drill in self._drills:   # the fault enters the next step (step + 1; the injector counts from 0)
            drill.before_step(step)
        self._reduce_pending_amax()
        self.flops.end_step()
        self.sampling.plan(step + 1)
        on_interval = step % self.config.monitor.check_interval == 0
        check = self.monitoring and (on_interval or self.skips.check_next)
        if not check:
            if on_interval and self.skips.pending:   # static modes: report device-side skips all the same
                self.skips.fetch(None)
            return []
        self.skips.check_next = False
        packed = monitors.reduce(monitors.pack(list(self.layers.values()), self.control.codes(self.device),
                                               self._rows))
        host = self.skips.fetch(packed)
        signals = monitors.signals_from(host, self.names, self.monitor_state, self.config.monitor)
        monitors.mark_nonfinite_origins(signals, host, self.names)
        self.last_signals = signals
        events = self.control.apply(monitors.control_codes(host), step, self.set_precision, self.release)
        if self.config.mode == "dynamic":
            flops = {u: len(self._unit_gemms(u)) * self.table.by_name[split_gemm(u)[0]].gemm_flops_per_token // 3
                     for u in self.policy.layers}
            for d in self.policy.decide(self._unit_signals(signals), flops):
                gemms = [g for _, g in self._free_gemms(d.layer)]
                events += self._switch(split_gemm(d.layer)[0], gemms, d.to, d.reason, step, d.signals)
        if self.events is not None:
            self.events.stats(step, {n: self._stats_record(n, s) for n, s in signals.items()})
        return events

    def _unit_signals(self, signals: dict[str, dict]) -> dict[str, dict]:
        """What the policy reads per unit: a layer's signals, or one GEMM's (those of the operands it reads)."""
        if self.granularity == "layer":
            return signals
        return {f"{n}:{g}": gs for n, s in signals.items() for g, gs in s["gemms"].items()}

    def _stats_record(self, name: str, signals: dict) -> dict:
        units = dict.fromkeys(self._unit_of(name, g) for g in GEMMS)
        states = [self.policy.layers[u].state for u in units]
        return {"precision": layer_precision(self._gemms_of(name)), "gemms": dict(self._gemms_of(name)),
                "state": worst_state(states), "preflight_holds": max(self.policy.layers[u].preflight_holds
                                                                     for u in units),
                **{k: json_safe(v) for k, v in signals.items() if k != "gemms"}}

    def _reduce_pending_amax(self) -> None:
        """Apply this step's deferred delayed-scaling updates with amaxes reduced (MAX) over the TP group."""
        states = [st for layer in self.layers.values() for st in layer.numerics.scaling.values()
                  if st.pending is not None]
        if not states:
            return
        amax = torch.stack([st.pending for st in states])
        torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=self._tp_group)
        for st, a in zip(states, amax.unbind()):
            st.apply_pending(a)

    def close(self, step: int) -> None:
        if self.events is not None:
            self.events.run_end(step)
            self.events.close()

    # ------------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        return {
            "precisions": self.gemm_precisions(),
            "granularity": self.granularity,
            "numerics": {n: l.numerics.state_dict() for n, l in self.layers.items()},
            **self.flops.state_dict(),      # flops, step_fraction
            "policy": self.policy.state_dict(),
            "monitor": self.monitor_state.state_dict(),
            **self.sampling.state_dict(),   # shadow_cursor, shadow_next
            "run_id": self.run_id,
            # The open check window: a checkpoint between two checks must carry what the next check will read.
            "last_step": self._last_step,
            **self.skips.state_dict(),      # force_check, pending_skips
            "window": {n: {"stats": l.numerics.stats.detach().cpu().clone(),
                           "grad_stats": l.numerics.grad_stats.detach().cpu().clone()}
                       for n, l in self.layers.items()},
        }

    def _policy_state(self, saved: dict, granularity: str) -> dict:
        """The policy state of a checkpoint, in this run's units: per layer to per GEMM (each GEMM starts from
        its layer's state) or per GEMM to per layer (a layer takes its most severe GEMM's state)."""
        if granularity == self.granularity:
            return saved
        if self.granularity == "gemm":
            return {f"{n}:{g}": saved[n] for n in saved for g in GEMMS}
        out = {}
        for n in self.names:
            states = [saved[f"{n}:{g}"] for g in GEMMS if f"{n}:{g}" in saved]
            if states:
                out[n] = next(st for st in states if st["state"] == worst_state([x["state"] for x in states]))
        return out

    def sharded_state_dict(self, prefix: str = "precision_runtime.") -> dict:
        """The runtime's state as entries of megatron's ``sharded_state_dict``, saved by ``dist_checkpointing``
        beside the model's and resharded with it (``dist_state.py``). A collective: call it on every rank."""
        from precisionrt.runtime import dist_state

        return dist_state.sharded_state_dict(self, prefix)

    def load_sharded_state_dict(self, loaded: dict) -> None:
        """Restore what ``dist_checkpointing.load`` returned for ``sharded_state_dict()``, in this layout or
        another (``dist_state.py``)."""
        from precisionrt.runtime import dist_state

        dist_state.load_sharded_state_dict(self, loaded)

    def load_state_dict(self, sd: dict) -> None:
        missing = set(self.names) - set(sd["precisions"])
        unknown = set(sd["precisions"]) - set(self.names)
        if missing or unknown:
            raise ValueError(f"runtime state does not match the model: missing {sorted(missing)[:3]}, "
                             f"unknown {sorted(unknown)[:3]}")
        if (absent := sorted(set(self.layers) - set(sd["numerics"]))):
            raise ValueError(f"runtime state holds no numerics for this rank's layers {absent[:3]}: it was saved "
                             "by a rank that held other layers")
        for name in self.names:   # checkpoints before per-GEMM precision held one precision per layer
            saved = sd["precisions"][name]
            self._assign(name, dict.fromkeys(GEMMS, saved) if isinstance(saved, str) else saved)
        for name, layer in self.layers.items():
            layer.numerics.load_state_dict(sd["numerics"][name])
        self.flops.load_state_dict(sd)
        self.policy.load_state_dict(self._policy_state(sd["policy"], sd.get("granularity", "layer")))
        self.monitor_state.load_state_dict(sd["monitor"])
        self.run_id = sd["run_id"]  # a resumed run continues the same run in the switch log
        if not self._resumed_from_given:
            self._resumed_from = int(sd["last_step"])
        if self.events is not None:
            if self.events.started and self.events.run_id != self.run_id:
                # records of another run were written before this load: the loaded run starts a segment of its own
                self.events.defer_start(self._run_start)
            self.events.run_id = self.run_id
        windowed = "window" in sd   # checkpoints from before the open window was saved resume at checks only
        self.sampling.load_state_dict(sd, int(sd["last_step"]) + 1 if windowed else None)
        if windowed:
            self._last_step = int(sd["last_step"])
            self.skips.load_state_dict(sd)
            for name, layer in self.layers.items():
                layer.numerics.stats.copy_(sd["window"][name]["stats"])
                layer.numerics.load_grad_stats(sd["window"][name]["grad_stats"])
        for drill in self._drills:
            drill.before_step(self._last_step)
