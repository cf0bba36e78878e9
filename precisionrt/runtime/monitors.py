"""Monitors: per-layer health signals from the statistics the GEMMs gather on the device.

Between checks every layer accumulates, on its device, the quantization statistics of its three tensor roles
(``fp8.STAT_FIELDS`` for input, weight, output gradient) and its gradient statistics (``numerics.GRAD_FIELDS``).
On a check step ``collect`` turns them into per-layer signals with tensor ops, packs all layers into one
``[layers, columns]`` buffer, reduces it with **one** all-reduce (MAX: every column is a worst case) over the
whole model's group, and copies it to the host **once**. Nothing here ever syncs per layer.

Signals (per layer; the worst tensor role unless said otherwise):

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
grad_rel_err       shadow steps: ||g_fp8 - g_bf16|| / ||g_bf16|| over the layer's dgrad and wgrad
grad_cos           shadow steps: cosine similarity of the FP8 and BF16 gradients
grad_norm_z        z-score of the layer's weight-gradient norm against its EMA across earlier checks
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
from precisionrt.numerics.state import GRAD_INDEX

SIGNALS = ("overflow", "headroom", "amax_jump", "underflow", "underflow_energy_fwd", "underflow_energy_grad",
           "nonfinite", "quant_error", "grad_rel_err",
           "grad_cos", "grad_norm_z")
_FMT_MAX = (E4M3.max, E4M3.max, E5M2.max)   # input, weight, grad_output
# Columns of the packed buffer (all reduce by MAX across ranks).
COLUMNS = ("overflow", "headroom", "underflow", "nonfinite_fwd", "nonfinite_grad", "quant_error", "amax_input", "amax_grad",
           "grad_rel_err", "grad_cos_gap", "shadow_count", "grad_norm", "full_steps", "control",
           "underflow_energy_fwd", "underflow_energy_grad")


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
    layers other ranks hold (``layout.py``), and the operator control codes of every layer."""
    total = control.shape[0]
    if rows is None:
        rows = torch.arange(len(layers), device=control.device)
    out = torch.zeros(total, len(COLUMNS), dtype=torch.float32, device=control.device)
    if layers:
        out.index_copy_(0, rows, _pack_local(layers).float())
    out[:, COLUMNS.index("control")] = control
    return out


def _pack_local(layers: list) -> torch.Tensor:
    drained = [layer.numerics.drain_stats() for layer in layers]
    stats = torch.stack([d[0] for d in drained])         # [L, roles, fields]
    grad = torch.stack([d[1] for d in drained])          # [L, grad fields]
    col = lambda name: stats[..., STAT_INDEX[name]]      # noqa: E731 - [L, roles]
    # one scaled_amax column per role, each divided by its format's max: no host tensor copied to the device
    headroom = torch.stack([col("scaled_amax")[:, r] / _FMT_MAX[r] for r in range(len(_FMT_MAX))], dim=1)
    shadow_ref = grad[:, GRAD_INDEX["shadow_ref_sq"]]
    cos = _safe_div(grad[:, GRAD_INDEX["shadow_dot"]],
                    (shadow_ref * grad[:, GRAD_INDEX["shadow_fp8_sq"]]).sqrt())
    has_shadow = grad[:, GRAD_INDEX["shadow_count"]] > 0
    flushed_share = _safe_div(col("flushed_energy"), col("weighted_signal"))   # [L, roles]
    packed = torch.stack([
        _safe_div(col("saturated"), col("numel")).amax(1),
        headroom.amax(1),
        _safe_div(col("underflow"), col("nonzero")).amax(1),
        col("nonfinite")[:, :2].sum(1),
        col("nonfinite")[:, 2],
        _safe_div(col("err_sq"), col("signal_sq")).sqrt().amax(1),
        col("amax")[:, 0],
        col("amax")[:, 2],
        _safe_div(grad[:, GRAD_INDEX["shadow_err_sq"]], shadow_ref).sqrt(),
        torch.where(has_shadow, 1.0 - cos, torch.zeros_like(cos)),
        grad[:, GRAD_INDEX["shadow_count"]],
        grad[:, GRAD_INDEX["wgrad_sq"]].sqrt(),
        (col("numel").sum(1) > 0).float(),
        torch.zeros_like(headroom[:, 0]),   # control: set by ``pack`` for every layer
        flushed_share[:, :2].amax(1),
        flushed_share[:, 2],
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
    """Per-layer signal dicts from the fetched buffer; updates the host-side baselines."""
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
        shadow = row[c["shadow_count"]] > 0
        full = row[c["full_steps"]] > 0   # window held a full-statistics step: counts and errors are known
        known = lambda col: float(row[c[col]]) if full else None  # noqa: E731
        out[name] = {
            "overflow": known("overflow"), "headroom": float(row[c["headroom"]]), "amax_jump": float(jump),
            "underflow": known("underflow"),
            "underflow_energy_fwd": known("underflow_energy_fwd"),
            "underflow_energy_grad": known("underflow_energy_grad"),
            "nonfinite": float(row[c["nonfinite_fwd"]] + row[c["nonfinite_grad"]]),
            "quant_error": known("quant_error"),
            "grad_rel_err": float(row[c["grad_rel_err"]]) if shadow else None,
            "grad_cos": 1.0 - float(row[c["grad_cos_gap"]]) if shadow else None,
            "grad_norm_z": float(z),
        }
    return out


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
    """Set ``nonfinite_origin`` on the layers where NaN/Inf entered, not every layer it flowed through.
    ``names`` (the rows of ``host``) are in forward order (``layout.LayerTable``).

    A nonfinite value in the forward pass propagates downstream, so its origin is the first layer in forward
    order that saw one in its input or weight; one born in the backward pass propagates upstream, so its origin
    is the last layer in forward order that saw one in its output gradient.
    """
    c = {name: i for i, name in enumerate(COLUMNS)}
    row = {n: host[i] for i, n in enumerate(names)}
    fwd = [n for n in names if row[n][c["nonfinite_fwd"]] > 0]
    bwd = [n for n in names if row[n][c["nonfinite_grad"]] > 0]
    origins = set(fwd[:1]) if fwd else set(bwd[-1:])
    for n in names:
        signals[n]["nonfinite_origin"] = n in origins


def control_codes(host: np.ndarray) -> list[int]:
    return [int(v) for v in host[:, COLUMNS.index("control")]]
