"""Monitors: per-layer health signals from the statistics the GEMMs gather on the device.

Between checks every layer accumulates, on its device, the quantization statistics of its three tensor roles
(``fp8.STAT_FIELDS`` for input, weight, output gradient) and its gradient statistics (``numerics.GRAD_FIELDS``).
On a check step ``collect`` turns them into per-layer signals with tensor ops, packs all layers into one
``[layers, columns]`` buffer, reduces it with **one** all-reduce (MAX: every column is a worst case) over the
whole model's group, and copies it to the host **once**. Nothing here ever syncs per layer.

Signals (per layer; the worst tensor role unless said otherwise). Every column is packed per operand (input
``x``, weight ``W``, output gradient ``dY``) and per backward GEMM, so each signal exists twice: for the layer
(the worst of its operands: ``signals_from``) and for each of its GEMMs (the worst of the operands that GEMM
reads, ``numerics.state.READ_BY``; gradient sensitivity from that GEMM's own shadow: ``"gemms"``), which is what
per-GEMM precision decides on.

=================  =======================================================================================
overflow           fraction of values saturated at +-max
headroom           max |x| * scale / fmt.max: above 1, the (delayed) scale was stale
amax_jump          this window's max input/grad amax over its EMA across earlier checks (host-side)
underflow          fraction of nonzero values flushed to zero (logged; a count says nothing of harm)
underflow_energy_* share of the GEMM product's energy that flushing removes (``fp8.tensor_stats``:
                   flushed w·x² over w·x², w the partner operand's squared column norms): ``_fwd`` for the
                   E4M3 forward operands (input, weight), ``_grad`` for the E5M2 output gradient
nonfinite          NaN/Inf values seen in the input, weight or output gradient (count); ``nonfinite_origin``
                   marks the layer where they entered (see ``mark_nonfinite_origins``)
quant_error        relative RMS error ||x - dq(q(x))|| / ||x||  (SQNR = -20 log10 of it)
grad_rel_err       shadow steps: ||g_fp8 - g_bf16|| / ||g_bf16|| over the layer's FP8 dgrad and wgrad (a GEMM: its own)
grad_cos           shadow steps: cosine similarity of the FP8 and BF16 gradients
grad_norm_z        z-score of the layer's weight-gradient norm against its EMA across earlier checks (a GEMM:
                   wgrad's, the GEMM that makes that gradient; amax_jump is the layer's for all three)
=================  =======================================================================================

A layer running BF16 records only amax, nonfinite and element counts, so its FP8-only signals read 0. Signals
that need exact statistics are None for a check window that held no full-statistics step (see
``MonitorConfig.full_stats_every``); the policy then neither counts nor clears their strikes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import torch

from precisionrt.config import Checked, Range
from precisionrt.numerics.fp8 import E4M3, E5M2, STAT_INDEX
from precisionrt.numerics.state import GRAD_INDEX, READ_BY, ROLES
from precisionrt.observe.events import GEMMS

SIGNALS = ("overflow", "headroom", "amax_jump", "underflow", "underflow_energy_fwd", "underflow_energy_grad",
           "nonfinite", "quant_error", "grad_rel_err",
           "grad_cos", "grad_norm_z")
_FMT_MAX = (E4M3.max, E4M3.max, E5M2.max)   # input, weight, grad_output
_ROLE_COLUMNS = ("overflow", "headroom", "underflow", "nonfinite", "quant_error", "flushed")
"""Packed once per operand: ``overflow_input``, ``overflow_weight``, ``overflow_grad_output``, ..."""
_SHADOW_GEMMS = ("dgrad", "wgrad", "layer")   # ``layer``: both backward GEMMs' sums together
# Columns of the packed buffer (all reduce by MAX across ranks).
COLUMNS = (*(f"{c}_{role}" for c in _ROLE_COLUMNS for role in ROLES),
           *(f"{c}_{g}" for c in ("grad_rel_err", "grad_cos_gap", "shadowed") for g in _SHADOW_GEMMS),
           "amax_input", "amax_grad", "shadow_count", "grad_norm", "full_steps",
           *(f"control_{g}" for g in GEMMS))


@dataclass
class MonitorConfig(Checked):
    """When statistics are looked at. Thresholds live in PolicyConfig."""

    check_interval: Annotated[int, Range(ge=1, le=10**6)] = 10
    """Steps between checks (one packed all-reduce + one host copy each)"""
    full_stats_every: Annotated[int, Range(ge=1, le=10**6)] = 10
    """Steps between exact-statistics steps (saturation, underflow, error counts); other steps keep only amax,
    headroom and a nonfinite indicator."""
    shadow_every: Annotated[int, Range(ge=0, le=10**6)] = 10
    """Steps between BF16 shadow gradient recomputations; 0 turns them off."""
    shadow_layers: Annotated[int, Range(ge=0, le=10**6)] = 2
    """Layers per shadow step, round-robin over the FP8 layers."""
    ema_decay: Annotated[float, Range(gt=0, lt=1)] = 0.8
    """For amax_jump and grad_norm_z baselines (per check)"""
    warmup_checks: Annotated[int, Range(ge=0, le=10**6)] = 3
    """Checks before amax_jump and grad_norm_z have a baseline."""


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / b.clamp_min(1e-30), torch.zeros_like(a))


def pack(layers: list, control: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Drain every layer's statistics into one ``[len(control), len(COLUMNS)]`` fp32 device tensor: this rank's
    ``layers`` at the whole model's ``rows`` (default: ``layers`` are the whole model), zeros in the rows of
    layers other ranks hold (``layer_table.py``), and the operator control codes (``control``: ``[layers, 3]``,
    one per GEMM) of every layer."""
    total = control.shape[0]
    if rows is None:
        rows = torch.arange(len(layers), device=control.device)
    out = torch.zeros(total, len(COLUMNS), dtype=torch.float32, device=control.device)
    if layers:
        out.index_copy_(0, rows, _pack_local(layers).float())
    first = COLUMNS.index("control_fprop")
    out[:, first:first + len(GEMMS)] = control
    return out


def _pack_local(layers: list) -> torch.Tensor:
    drained = [layer.numerics.drain_stats() for layer in layers]
    stats = torch.stack([d[0] for d in drained])         # [L, roles, fields]
    grad = torch.stack([d[1] for d in drained])          # [L, grad fields]
    col = lambda name: stats[..., STAT_INDEX[name]]      # noqa: E731 - [L, roles]
    g = lambda name: grad[:, GRAD_INDEX[name]]           # noqa: E731 - [L]
    # one scaled_amax column per role, each divided by its format's max: no host tensor copied to the device
    per_role = {
        "overflow": _safe_div(col("saturated"), col("numel")),
        "headroom": torch.stack([col("scaled_amax")[:, r] / _FMT_MAX[r] for r in range(len(_FMT_MAX))], dim=1),
        "underflow": _safe_div(col("underflow"), col("nonzero")),
        "nonfinite": col("nonfinite"),
        "quant_error": _safe_div(col("err_sq"), col("signal_sq")).sqrt(),
        "flushed": _safe_div(col("flushed_energy"), col("weighted_signal")),
    }
    sums = {gemm: [g(f"{field}_{gemm}") for field in ("shadow_err_sq", "shadow_ref_sq", "shadow_dot", "shadow_fp8_sq")]
            for gemm in ("dgrad", "wgrad")}
    sums["layer"] = [a + b for a, b in zip(sums["dgrad"], sums["wgrad"])]
    rel_err, cos_gap, shadowed = [], [], []
    for gemm in _SHADOW_GEMMS:   # a GEMM was shadowed when its BF16 reference has any energy
        err, ref, dot, ours = sums[gemm]
        cos = _safe_div(dot, (ref * ours).sqrt())
        rel_err.append(_safe_div(err, ref).sqrt())
        cos_gap.append(torch.where(ref > 0, 1.0 - cos, torch.zeros_like(cos)))
        shadowed.append((ref > 0).float())
    zeros = torch.zeros_like(g("shadow_count"))
    packed = torch.stack([
        *(per_role[c][:, r] for c in _ROLE_COLUMNS for r in range(len(ROLES))),
        *rel_err, *cos_gap, *shadowed,
        col("amax")[:, 0],
        col("amax")[:, 2],
        g("shadow_count"),
        g("wgrad_sq").sqrt(),
        (col("numel").sum(1) > 0).float(),
        *(zeros for _ in GEMMS),   # control: set by ``pack`` for every layer
    ], dim=1)
    return packed.nan_to_num(nan=0.0, posinf=1e30)


def reduce(packed: torch.Tensor, group=None) -> torch.Tensor:
    """The check step's one collective (MAX: every column is a worst case), in place."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX, group=group)
    return packed



@dataclass
class _Baseline:
    """EMA mean/variance of a host-side scalar across checks."""

    mean: float = 0.0
    var: float = 0.0
    n: int = 0

    def update(self, x: float, decay: float) -> None:
        if self.n == 0:
            self.mean, self.var = x, 0.0
        else:
            delta = x - self.mean
            self.mean += (1 - decay) * delta
            self.var = decay * (self.var + (1 - decay) * delta * delta)
        self.n += 1


@dataclass
class MonitorState:
    """Host-side per-layer baselines across checks (part of the runtime's checkpoint)."""

    amax: dict[str, _Baseline] = field(default_factory=dict)
    grad_norm: dict[str, _Baseline] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {kind: {n: [b.mean, b.var, b.n] for n, b in getattr(self, kind).items()}
                for kind in ("amax", "grad_norm")}

    def load_state_dict(self, sd: dict) -> None:
        for kind in ("amax", "grad_norm"):
            getattr(self, kind).clear()
            for n, (mean, var, count) in sd[kind].items():
                getattr(self, kind)[n] = _Baseline(mean, var, int(count))


def signals_from(host: np.ndarray, names: list[str], state: MonitorState, cfg: MonitorConfig) -> dict[str, dict]:
    """Per-layer signal dicts from the fetched buffer, each with the signals of its three GEMMs under
    ``"gemms"``; updates the host-side baselines."""
    c = {name: i for i, name in enumerate(COLUMNS)}
    out = {}
    for i, name in enumerate(names):
        row = host[i]
        amax = max(row[c["amax_input"]], row[c["amax_grad"]])
        amax_base = state.amax.setdefault(name, _Baseline())
        jump = amax / amax_base.mean if amax_base.n >= cfg.warmup_checks and amax_base.mean > 0 else 0.0
        gn_base = state.grad_norm.setdefault(name, _Baseline())
        gnorm = float(row[c["grad_norm"]])
        z = 0.0
        if gn_base.n >= cfg.warmup_checks and gn_base.var > 0:
            z = (gnorm - gn_base.mean) / math.sqrt(gn_base.var)
        if math.isfinite(amax) and amax > 0:
            amax_base.update(float(amax), cfg.ema_decay)
        if math.isfinite(gnorm) and gnorm > 0:
            gn_base.update(gnorm, cfg.ema_decay)
        full = row[c["full_steps"]] > 0   # window held a full-statistics step: counts and errors are known
        signals = _signals(row, c, ROLES, "layer", full)
        signals.update({"amax_jump": float(jump), "grad_norm_z": float(z)})
        signals["gemms"] = {}
        for gemm, roles in READ_BY.items():
            s = _signals(row, c, roles, gemm if gemm != "fprop" else None, full)
            s.update({"amax_jump": float(jump), "grad_norm_z": float(z) if gemm == "wgrad" else 0.0})
            signals["gemms"][gemm] = s
        out[name] = signals
    return out


def _signals(row: np.ndarray, c: dict, roles: tuple[str, ...], shadow: str | None, full: bool) -> dict:
    """The signals of the operands ``roles`` (the worst of them) and of ``shadow``'s gradient comparison."""
    worst = lambda col, among=roles: max((float(row[c[f"{col}_{r}"]]) for r in among), default=0.0)  # noqa: E731
    known = lambda value: value if full else None  # noqa: E731
    shadowed = shadow is not None and row[c[f"shadowed_{shadow}"]] > 0
    e4m3 = tuple(r for r in roles if r != "grad_output")
    return {
        "overflow": known(worst("overflow")), "headroom": worst("headroom"),
        "underflow": known(worst("underflow")),
        "underflow_energy_fwd": known(worst("flushed", e4m3)),
        "underflow_energy_grad": known(worst("flushed", tuple(r for r in roles if r == "grad_output"))),
        "nonfinite": float(sum(row[c[f"nonfinite_{r}"]] for r in roles)),
        "quant_error": known(worst("quant_error")),
        "grad_rel_err": float(row[c[f"grad_rel_err_{shadow}"]]) if shadowed else None,
        "grad_cos": 1.0 - float(row[c[f"grad_cos_gap_{shadow}"]]) if shadowed else None,
    }


# Signals where a low value is the bad one (margin before overflow, agreement with the BF16 gradient).
WORSE_WHEN_LOW = frozenset({"headroom", "grad_cos"})


def worst(signals: dict[str, dict], names: list[str]) -> dict[str, float]:
    """Per signal, the worst value over the layers and that layer's index in ``names``: the aggregates a
    dashboard shows whatever the model size (``precision/worst/<signal>``, ``precision/worst_layer/<signal>``)."""
    out: dict[str, float] = {}
    keys = dict.fromkeys(k for sig in signals.values() for k, v in sig.items() if isinstance(v, float))
    for key in keys:
        values = [(v, n) for n, sig in signals.items() if isinstance(v := sig.get(key), float) and math.isfinite(v)]
        if not values:
            continue
        value, name = (min if key in WORSE_WHEN_LOW else max)(values)
        out[f"precision/worst/{key}"] = value
        out[f"precision/worst_layer/{key}"] = names.index(name)
    return out


def mark_nonfinite_origins(signals: dict[str, dict], host: np.ndarray, names: list[str]) -> None:
    """Set ``nonfinite_origin`` on the layers where NaN/Inf entered, not every layer it flowed through, and on
    the GEMMs of that layer that read the operand it entered through. ``names`` (the rows of ``host``) are in
    forward order (``layer_table.LayerTable``).

    A nonfinite value in the forward pass propagates downstream, so its origin is the first layer in forward
    order that saw one in its input or weight (the GEMMs reading that operand: fprop and wgrad for the input,
    fprop and dgrad for the weight); one born in the backward pass propagates upstream, so its origin is the
    last layer in forward order that saw one in its output gradient (dgrad and wgrad).
    """
    c = {name: i for i, name in enumerate(COLUMNS)}
    row = {n: host[i] for i, n in enumerate(names)}
    seen = lambda n, role: row[n][c[f"nonfinite_{role}"]] > 0  # noqa: E731
    fwd = [n for n in names if seen(n, "input") or seen(n, "weight")]
    bwd = [n for n in names if seen(n, "grad_output")]
    if fwd:
        origins = {fwd[0]: [r for r in ("input", "weight") if seen(fwd[0], r)]}
    else:
        origins = {n: ["grad_output"] for n in bwd[-1:]}
    for n in names:
        signals[n]["nonfinite_origin"] = n in origins
        for gemm, gs in signals[n].get("gemms", {}).items():
            gs["nonfinite_origin"] = any(r in READ_BY[gemm] for r in origins.get(n, ()))


def control_codes(host: np.ndarray) -> list[dict[str, int]]:
    """Per layer, the operator's request code for each GEMM (0: none)."""
    first = COLUMNS.index("control_fprop")
    return [dict(zip(GEMMS, (int(v) for v in r[first:first + len(GEMMS)]))) for r in host]
