"""PrecisionRuntime (contract C2): wires managed layers, monitors and policy; owns the switch log, FLOP
accounting, operator overrides and the runtime's checkpoint state.

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
and policy promote and demote). Pins (fnmatch patterns over layer names) hold layers whatever the mode.

Host synchronisation: ``end_step`` transfers nothing on ordinary steps; on a check step (every
``monitor.check_interval`` steps) it makes one packed all-reduce and one device->host copy, whatever the number
of layers. ``should_skip_step`` costs one scalar transfer per step (as Megatron's grad-norm check does) and is
optional.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from precisionrt import monitors
from precisionrt.control import CODE_NAMES, CONTROL_CODES, ControlFile
from precisionrt.events import EventLog, SwitchEvent, json_safe, read_log
from precisionrt.fp8 import ScalingConfig
from precisionrt.linear import precision_layers
from precisionrt.numerics import LayerNumerics
from precisionrt.megatron import match_layers
from precisionrt.monitors import MonitorConfig, MonitorState
from precisionrt.policy import Policy, PolicyConfig

EVENTS_FILE = "precision_events.jsonl"


@dataclass
class RuntimeConfig:
    mode: Literal["dynamic", "fp8", "bf16"] = "dynamic"
    pin_bf16: list[str] = field(default_factory=list)   # fnmatch patterns over managed layer names
    pin_fp8: list[str] = field(default_factory=list)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    observe: bool = False                # static modes: run the monitors and log stats, decide nothing
    control_file: str = "precision_control.json"   # in the run dir; "" disables operator control
    skip_nonfinite_steps: bool = True
    fused_kernels: bool = True           # CUDA: fused quantization kernels (False: the eager reference path)


def _tensor_parallel_group():
    """Megatron's tensor-parallel group when it has more than one rank, else None."""
    from megatron.core import parallel_state

    if not (torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return None
    group = parallel_state.get_tensor_model_parallel_group()
    return group if torch.distributed.get_world_size(group) > 1 else None


def _default_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class PrecisionRuntime:
    def __init__(self, model: torch.nn.Module, config: RuntimeConfig, run_dir: str | Path | None = None,
                 run_config: dict | None = None, rank: int | None = None):
        """``rank`` defaults to this process's rank in ``torch.distributed`` (0 when it is not initialised):
        rank 0 writes the switch log and reads the control file."""
        self.config = config
        rank = _default_rank() if rank is None else rank
        self.layers = precision_layers(model)
        if not self.layers:
            raise ValueError("model has no PrecisionLinear layers: build it with precisionrt.megatron.precision_layer_spec")
        self.names = list(self.layers)
        for layer in self.layers.values():
            layer.numerics = LayerNumerics(config.scaling, layer.weight.device)
            layer.numerics.fused = config.fused_kernels
        # Delayed scaling under tensor parallelism: every rank quantizes a shard of the same logical tensor, so
        # the amax histories are reduced across the TP group (one collective per step, in end_step), as
        # Transformer Engine does; otherwise each rank would scale its shard differently.
        self._tp_group = _tensor_parallel_group()
        if config.scaling.recipe == "delayed" and self._tp_group is not None:
            for layer in self.layers.values():
                for state in layer.numerics.scaling.values():
                    state.defer = True
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
            layer.precision = self.pinned.get(name, initial) if layer.fp8_capable else "bf16"
        # layers that cannot run fp8 are, for the policy, pinned to bf16
        fixed = {**{n: "bf16" for n, l in self.layers.items() if not l.fp8_capable}, **self.pinned}
        self.policy = Policy(config.policy, self.names, fixed, self.precisions())
        self.monitor_state = MonitorState()
        self.monitoring = config.mode == "dynamic" or config.observe
        for layer in self.layers.values():
            layer.numerics.collect = self.monitoring
        self.last_signals: dict[str, dict] = {}
        self.rank = rank
        self._flops_at_last_step = self._flop_totals()
        self._step_fraction = self.fp8_flop_fraction()
        self._force_check = False
        self._pending_skips: list[tuple[int, torch.Tensor]] = []   # (step, device flag) not yet fetched
        self._last_step = 0
        self._skipped: list[int] = []
        self._shadow_cursor = 0
        self._control: ControlFile | None = None   # opened with the switch log's run directory
        self.control_rejected: list[str] = []
        self.run_dir: Path | None = None
        self.run_id = uuid.uuid4().hex[:12]
        self.events: EventLog | None = None
        if run_dir is not None:
            self.start_log(run_dir, run_config, rank)
        self._schedule_sampling(1)

    def start_log(self, run_dir: str | Path, run_config: dict | None = None, rank: int | None = None,
                  resumed_from: int | None = None) -> None:
        """Open the switch log in ``run_dir`` (rank 0 writes) and record run_start with the layer table.
        A resumed run appends to the existing log; its unreadable lines are counted and reported, not fatal."""
        rank = _default_rank() if rank is None else rank
        self.run_dir, self.rank = Path(run_dir), rank
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / EVENTS_FILE
        if rank == 0 and resumed_from is not None and path.exists():
            existing = read_log(path)
            if existing.skipped_lines:
                print(f"precisionrt: {path}: {existing.skipped_lines} unreadable line(s) skipped, e.g. "
                      f"{existing.skipped_examples[0]}", file=sys.stderr, flush=True)
        self.events = EventLog(path, self.run_id, enabled=rank == 0)
        self.events.run_start(self.layer_table(), run_config or {"precision": asdict(self.config)}, resumed_from)

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
            return sum(f for n, f in per_token.items() if self.layers[n].precision == "fp8") / sum(per_token.values())
        return fp8 / (fp8 + bf16)

    def metrics(self) -> dict:
        """Run-level and (after a check) per-layer metrics for the loggers."""
        out = {"precision/fp8_flop_fraction": self.fp8_flop_fraction(),
               "precision/fp8_flop_fraction_step": self._step_fraction,
               "precision/bf16_layers": sum(p == "bf16" for p in self.precisions().values())}
        for name, sig in self.last_signals.items():
            out[f"precision/{name}/is_fp8"] = int(self.layers[name].precision == "fp8")
            out.update({f"precision/{name}/{k}": v for k, v in sig.items() if isinstance(v, float)})
        return out

    # ---------------------------------------------------------------------------------------- changes

    def set_precision(self, name: str, precision: str, reason: str = "manual", step: int = -1,
                      signals: dict | None = None) -> SwitchEvent | None:
        """Switch one layer (effective from its next forward) and log it. Returns the event, or None if the
        layer already runs at ``precision``. A manual switch holds the layer there until ``release``.
        Unknown layers and impossible requests raise ValueError."""
        if name not in self.layers:
            raise ValueError(f"unknown layer {name!r}; managed layers: {self.names[:4]} ... ({len(self.names)})")
        layer = self.layers[name]
        if reason == "manual":
            if name in self.pinned and self.pinned[name] != precision:
                raise ValueError(f"layer {name!r} is pinned to {self.pinned[name]}")
            if precision == "fp8" and not layer.fp8_capable:
                raise ValueError(f"layer {name!r} cannot run fp8: {layer.fp8_unsupported_reason}")
            self.policy.hold(name, precision)
        if layer.precision == precision:
            return None
        event = SwitchEvent(step=step, layer=name, from_=layer.precision, to=precision, reason=reason,
                            signals={k: json_safe(v) for k, v in (signals or {}).items()})
        layer.precision = precision  # validates; resets scaling state on a return to fp8
        if self.events is not None:
            self.events.switch(event)
        return event

    def release(self, name: str) -> None:
        """End a manual hold: the policy decides for this layer again."""
        if name not in self.layers:
            raise ValueError(f"unknown layer {name!r}")
        self.policy.hold(name, None)

    def should_skip_step(self, grad_norm: torch.Tensor) -> bool:
        """True when the gradients are not finite on any rank: skip the optimizer step. The next ``end_step``
        then checks at once, so the layer where NaN/Inf entered is promoted before the next forward."""
        if not self.config.skip_nonfinite_steps:
            return False
        bad = (~torch.isfinite(grad_norm.detach().float())).float().reshape(1)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        skip = bool(bad.item())
        self._force_check |= skip
        return skip

    def skip_on_device(self, grad_norm: torch.Tensor, optimizer: torch.optim.Optimizer, step: int) -> None:
        """``should_skip_step`` without a host synchronisation, for CUDA: the nonfinite flag (reduced across
        ranks) is handed to a fused Adam/AdamW as ``optimizer.found_inf`` (the protocol of torch's GradScaler),
        which skips the update on the device. The flags are fetched with the next check's one transfer and
        reported by ``take_skipped``; the layer where NaN/Inf entered is promoted at that check (on the host
        path, at once)."""
        if not self.config.skip_nonfinite_steps:
            return
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ValueError("skip_on_device needs an optimizer that honours found_inf, e.g. "
                             "torch.optim.AdamW(..., fused=True); use should_skip_step otherwise")
        bad = (~torch.isfinite(grad_norm.detach().float())).float().reshape(())
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        optimizer.found_inf = bad
        self._pending_skips.append((step, bad))

    def take_skipped(self, flush: bool = False) -> list[int]:
        """Steps skipped on the device (``skip_on_device``) that the last check learnt of; clears them.
        ``flush`` fetches the flags not yet fetched first (one transfer: at the end of a run)."""
        if flush and self._pending_skips:
            self._fetch_pending_skips(None)
        out, self._skipped = self._skipped, []
        return out

    def _fetch_pending_skips(self, packed: torch.Tensor | None):
        """One device->host transfer of ``packed`` (the check's buffer) together with the pending skip flags."""
        steps = [s for s, _ in self._pending_skips]
        flags = [f.reshape(1) for _, f in self._pending_skips]
        self._pending_skips = []
        parts = ([packed.reshape(-1)] if packed is not None else []) + flags
        if not parts:
            return None
        host = torch.cat(parts).cpu().numpy() if len(parts) > 1 else parts[0].cpu().numpy()
        n_flags = len(flags)
        self._skipped += [s for s, f in zip(steps, host[len(host) - n_flags:]) if f > 0]
        return host[: len(host) - n_flags].reshape(packed.shape) if packed is not None else None

    def end_step(self, step: int) -> list[SwitchEvent]:
        """Close optimizer step ``step`` (counted from 1, as metrics count): account FLOPs; on check steps
        (``step % monitor.check_interval == 0``, or at once after a skipped nonfinite step) monitor, decide and
        apply. Returns the switches made; they take effect at the next forward."""
        self._last_step = step
        self._reduce_pending_amax()
        totals = self._flop_totals()
        d_fp8, d_bf16 = (t - p for t, p in zip(totals, self._flops_at_last_step))
        self._step_fraction = d_fp8 / (d_fp8 + d_bf16) if d_fp8 + d_bf16 else self._step_fraction
        self._flops_at_last_step = totals
        self._schedule_sampling(step + 1)
        on_interval = step % self.config.monitor.check_interval == 0
        check = self.monitoring and (on_interval or self._force_check)
        if not check:
            if on_interval and self._pending_skips:   # static modes: report device-side skips all the same
                self._fetch_pending_skips(None)
            return []
        self._force_check = False
        packed = monitors.reduce(monitors.pack(list(self.layers.values()), self._control_tensor()))
        host = self._fetch_pending_skips(packed)
        signals = monitors.signals_from(host, self.names, self.monitor_state, self.config.monitor)
        order = sorted(self.names, key=lambda n: self.layers[n].forward_seq)
        monitors.mark_nonfinite_origins(signals, host, self.names, order)
        self.last_signals = signals
        events = self._apply_control(monitors.control_codes(host), step)
        if self.config.mode == "dynamic":
            flops = {n: l.gemm_flops_per_token for n, l in self.layers.items()}
            for d in self.policy.decide(signals, flops):
                if (e := self.set_precision(d.layer, d.to, reason=d.reason, step=step, signals=d.signals)):
                    events.append(e)
        if self.events is not None:
            self.events.stats(step, {n: {"precision": self.layers[n].precision, "state": self.policy.layers[n].state,
                                         "preflight_holds": self.policy.layers[n].preflight_holds,
                                         **{k: json_safe(v) for k, v in s.items()}} for n, s in signals.items()})
        return events

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

    def _schedule_sampling(self, step: int) -> None:
        """For upcoming step ``step``: exact statistics every ``full_stats_every`` steps, and a BF16 shadow
        backward for the next few FP8 layers (round-robin, the same on every rank) every ``shadow_every``."""
        m = self.config.monitor
        for layer in self.layers.values():
            layer.numerics.shadow = False
            layer.numerics.full_stats = step % m.full_stats_every == 0
        if not self.monitoring or m.shadow_every == 0 or step % m.shadow_every:
            return
        candidates = [n for n in self.names if self.layers[n].precision == "fp8"]
        for i in range(min(m.shadow_layers, len(candidates))):
            self.layers[candidates[(self._shadow_cursor + i) % len(candidates)]].numerics.shadow = True
        self._shadow_cursor += m.shadow_layers

    # ---------------------------------------------------------------------------- operator control file

    def _control_tensor(self) -> torch.Tensor:
        """Rank 0 reads the control file when it changed and encodes it per layer; other ranks send zeros.
        The MAX all-reduce of the packed buffer then delivers rank 0's codes to every rank."""
        device = next(iter(self.layers.values())).weight.device
        requests = {}
        if self.rank == 0 and self.run_dir is not None and self.config.control_file:
            if self._control is None:
                self._control = ControlFile(self.run_dir / self.config.control_file, self.names, self._reject)
            requests = self._control.read()
        if not requests:   # the usual case: zeros made on the device, nothing copied from the host
            return torch.zeros(len(self.names), dtype=torch.float32, device=device)
        codes = torch.zeros(len(self.names), dtype=torch.float32)
        for name, action in requests.items():
            codes[self.names.index(name)] = CONTROL_CODES[action]
        if device.type == "cuda":   # from pinned memory, asynchronously: no synchronisation with the host
            return codes.pin_memory().to(device, non_blocking=True)
        return codes.to(device)

    def _reject(self, message: str) -> None:
        self.control_rejected.append(message)
        print(f"precisionrt: control file entry rejected: {message}", file=sys.stderr, flush=True)

    def _apply_control(self, codes: list[int], step: int) -> list[SwitchEvent]:
        events = []
        for name, code in zip(self.names, codes):
            action = CODE_NAMES.get(code)
            if action is None:
                continue
            if action == "auto":
                self.release(name)
                continue
            try:
                if (e := self.set_precision(name, action, reason="manual", step=step)):
                    events.append(e)
            except ValueError as err:  # pinned, or cannot run fp8: refuse this entry, keep running
                self._reject(str(err))
        return events

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
            "policy": self.policy.state_dict(),
            "monitor": self.monitor_state.state_dict(),
            "shadow_cursor": self._shadow_cursor,
            "shadow_next": [n for n, l in self.layers.items() if l.numerics.shadow],
            "run_id": self.run_id,
            # The open check window: a checkpoint between two checks must carry what the next check will read.
            "last_step": self._last_step,
            "force_check": self._force_check,
            "step_fraction": self._step_fraction,
            "window": {n: {"stats": l.numerics.stats.detach().cpu().clone(),
                           "grad_stats": l.numerics.grad_stats.detach().cpu().clone()}
                       for n, l in self.layers.items()},
            "pending_skips": [[s, float(f)] for s, f in self._pending_skips] + [[s, 1.0] for s in self._skipped],
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
        self.policy.load_state_dict(sd["policy"])
        self.monitor_state.load_state_dict(sd["monitor"])
        self._shadow_cursor = int(sd["shadow_cursor"])
        self.run_id = sd["run_id"]  # a resumed run continues the same run in the switch log
        for name, layer in self.layers.items():
            layer.numerics.shadow = name in sd["shadow_next"]
        self._flops_at_last_step = self._flop_totals()
        if "window" in sd:   # checkpoints from before the open window was saved resume at check boundaries only
            self._last_step = int(sd["last_step"])
            self._force_check = bool(sd["force_check"])
            self._step_fraction = float(sd["step_fraction"])
            for name, layer in self.layers.items():
                layer.numerics.stats.copy_(sd["window"][name]["stats"])
                layer.numerics.grad_stats.copy_(sd["window"][name]["grad_stats"])
                # the sampling schedule of the next step, as end_step(last_step) set it
                layer.numerics.full_stats = (self._last_step + 1) % self.config.monitor.full_stats_every == 0
            self._pending_skips = []
            self._skipped = [int(s) for s, flag in sd["pending_skips"] if flag > 0]

