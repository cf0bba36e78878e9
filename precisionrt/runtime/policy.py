"""The promotion policy: a state machine per unit that turns monitor signals into precision decisions. A unit is
a layer (``granularity = "layer"``: its three GEMMs move together) or one GEMM of a layer (``"gemm"``, the
default: ``layer:fprop``, ``layer:dgrad``, ``layer:wgrad``, each read by its own signals, those of the operands
it reads, so trouble in one operand promotes exactly the GEMMs that read it). The runtime names the units and
applies the decisions; below, "layer" means a unit.

    fp8 ──(signal over threshold on `patience` consecutive checks; nonfinite or `immediate_ratio` times over
           the threshold: at once)──► bf16
    bf16 ──(after a cooldown of `cooldown_checks * backoff**(failures-1)` checks, and once a pre-flight check
           passes)──► probation (runs fp8)
    probation ──(any signal over threshold on one check)──► bf16, failures + 1
    probation ──(`probation_checks` clean checks)──► fp8

Pre-flight: while a layer runs BF16, full-statistics checks quantize its tensors in a dry run with fresh
scaling (nothing is used). A layer whose cooldown is over returns only when those would-be signals (overflow,
underflow, quantization error) are known and under their thresholds; until then it stays in BF16 and is
re-checked at every check. An outlier that persists therefore costs no failed probation (each failure runs
the unsafe layer in FP8 for a check interval); gradient sensitivity, which needs the FP8 backward, is still
tested by probation.

Pinned layers never move; layers under a manual hold (API or control file) are left alone until released.
A budget caps the share of GEMM FLOPs in BF16: when promotions exceed it, the promoted layers that were least
sensitive (smallest signal/threshold ratio at promotion) return to FP8 first, on probation.

The policy is pure host logic over the reduced signals, so every rank computes the same decisions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal

from precisionrt.config import Checked, Fraction, Range
from precisionrt.observe.events import Precision, Reason

PolicyState = Literal["fp8", "bf16", "probation"]   # probation: back in FP8, watched more closely
_SEVERITY = {"fp8": 0, "probation": 1, "bf16": 2}


def worst_state(states: list[str]) -> str:
    """The most severe of some units' states (bf16, then probation, then fp8): a layer's, from its GEMMs'."""
    return max(states, key=_SEVERITY.__getitem__)

# signal -> reason recorded in the switch log
REASON_OF = {"overflow": "overflow", "headroom": "overflow", "underflow": "underflow",
             "underflow_energy_fwd": "underflow", "underflow_energy_grad": "underflow", "quant_error": "quant_error",
             "amax_jump": "overflow", "grad_rel_err": "grad_sensitivity", "grad_norm_z": "grad_sensitivity"}


@dataclass
class PolicyConfig(Checked):
    """Thresholds (a layer is unsafe in FP8 when a signal exceeds its threshold; 0 disables a trigger).

    Defaults were calibrated on healthy runs of configs/lm_tiny_cpu.toml (docs/dynamic-precision.md): the worst healthy
    values are far below them."""

    overflow: Fraction = 1e-3
    """Fraction of values saturated (over the check window)"""
    headroom: Annotated[float, Range(ge=0, le=1e6)] = 16.0
    """Max |x| * scale / fmt.max: a scale stale by this factor (delayed scaling); current scaling keeps it at 1,
    healthy delayed runs stay under ~8."""
    underflow: Fraction = 0.0
    """Fraction of nonzero values flushed (off: many tiny gradient values flush harmlessly; logged, and the energy
    signals below judge the harm)"""
    underflow_energy_fwd: Fraction = 0.01
    """Share of the forward GEMM's energy flushed (E4M3 input and weight)"""
    underflow_energy_grad: Fraction = 0.01
    """Share of the dgrad GEMM's energy flushed (E5M2 output gradient)"""
    quant_error: Annotated[float, Range(ge=0, le=100)] = 0.2
    """Relative RMS quantization error (healthy E4M3 ~0.03, E5M2 ~0.06)"""
    amax_jump: Annotated[float, Range(ge=0, le=1e12)] = 0.0
    """Amax over its EMA (off by default: overflow catches its harm)"""
    grad_rel_err: Annotated[float, Range(ge=0, le=100)] = 0.35
    """Shadow: ||g_fp8 - g_bf16|| / ||g_bf16||."""
    grad_cos: Fraction = 0.9
    """Shadow: promote when cosine similarity falls below this (0: off)"""
    grad_norm_z: Annotated[float, Range(ge=0, le=1e6)] = 0.0
    """Weight-gradient norm z-score (off by default: noisy early in training)"""
    patience: Annotated[int, Range(ge=1, le=10**6)] = 2
    """Consecutive checks over a threshold before a promotion."""
    immediate_ratio: Annotated[float, Range(gt=1, le=1e12)] = 10.0
    """A signal this many times over its threshold acts at once (as nonfinite)"""
    cooldown_checks: Annotated[int, Range(ge=1, le=10**9)] = 10
    """Checks in BF16 before the first return to FP8 is tried."""
    backoff: Annotated[float, Range(ge=1, le=1000)] = 2.0
    """Cooldown multiplier per further failure."""
    max_cooldown_checks: Annotated[int, Range(ge=1, le=10**9)] = 1000
    probation_checks: Annotated[int, Range(ge=0, le=10**6)] = 5
    """Clean checks before a returned layer counts as healthy again."""
    max_bf16_flop_fraction: Fraction = 1.0
    """Budget: largest share of GEMM FLOPs allowed in BF16."""
    preflight: bool = True
    """Return a layer to FP8 only when its dry-run FP8 statistics are clean."""
    granularity: Literal["gemm", "layer"] = "gemm"
    """What a decision moves: one GEMM (fprop, dgrad, wgrad; trouble in the input x promotes fprop and wgrad, in
    the weight fprop and dgrad, in the output gradient dgrad and wgrad) or the whole layer."""

    def validate(self) -> None:
        if self.max_cooldown_checks < self.cooldown_checks:
            raise ValueError(f"max_cooldown_checks ({self.max_cooldown_checks}) must be >= cooldown_checks "
                             f"({self.cooldown_checks})")


@dataclass
class LayerState:
    state: PolicyState = "fp8"
    strikes: dict = field(default_factory=dict)
    checks_in_state: int = 0
    failures: int = 0
    sensitivity: float = 0.0
    hold: Precision | None = None
    """A manual hold."""
    preflight_holds: int = 0
    """Checks on which a due return waited for clean dry-run statistics."""


@dataclass(frozen=True)
class Decision:
    layer: str
    to: Precision
    reason: Reason
    signals: dict


class Policy:
    def __init__(self, config: PolicyConfig, layers: list[str], pinned: dict[str, str],
                 initial: dict[str, str]):
        self.config = config
        self.pinned = dict(pinned)
        self.layers = {n: LayerState(state=initial[n]) for n in layers}

    # ------------------------------------------------------------------------------------- triggers

    def exceeded(self, s: dict) -> dict[str, float]:
        """Reasons whose threshold ``s`` exceeds, with the worst signal/threshold ratio for each."""
        c = self.config
        out: dict[str, float] = {}
        for signal, reason in REASON_OF.items():
            threshold, value = getattr(c, signal), s.get(signal)
            if threshold > 0 and value is not None and value > threshold:
                out[reason] = max(out.get(reason, 0.0), value / threshold)
        cos = s.get("grad_cos")
        if c.grad_cos > 0 and cos is not None and cos < c.grad_cos:
            out["grad_sensitivity"] = max(out.get("grad_sensitivity", 0.0), (1 - cos) / (1 - c.grad_cos + 1e-12))
        if s.get("nonfinite_origin"):
            out["nonfinite"] = float("inf")
        return out

    def preflight_passes(self, s: dict) -> bool:
        """Would the layer be healthy in FP8? Its dry-run statistics must be known and under threshold."""
        quantization = ("overflow", "underflow", "underflow_energy_fwd", "underflow_energy_grad", "quant_error")
        if any(s.get(k) is None for k in quantization):
            return False
        return not self.exceeded({k: s[k] for k in quantization})

    # ------------------------------------------------------------------------------------ decisions

    def hold(self, layer: str, precision: str | None) -> None:
        """Manual hold (``None`` releases it: the policy takes the layer back in its current precision)."""
        st = self.layers[layer]
        st.hold = precision
        if precision is not None:
            st.state, st.checks_in_state, st.strikes = precision, 0, {}

    def promote(self, layer: str, severity: float) -> bool:
        """A signal from outside the monitors (RL's mismatch attribution) promotes ``layer``; it comes back as any
        promoted layer does (cooldown with back-off, pre-flight, probation). False, and nothing changes, for a
        pinned or held layer or one already in BF16."""
        st = self.layers[layer]
        if layer in self.pinned or st.hold is not None or st.state == "bf16":
            return False
        st.state, st.checks_in_state, st.strikes = "bf16", 0, {}
        st.failures += 1
        st.sensitivity = severity
        return True

    def decide(self, signals: dict[str, dict], flops_per_token: dict[str, int]) -> list[Decision]:
        c = self.config
        decisions: list[Decision] = []
        for name, st in self.layers.items():
            if name in self.pinned or st.hold is not None:
                continue
            s = signals.get(name, {})
            if st.state in ("fp8", "probation"):
                over = self.exceeded(s)
                unknown = {REASON_OF[k] for k in REASON_OF if s.get(k, 0.0) is None} - over.keys()
                st.strikes = {**{r: n for r, n in st.strikes.items() if r in unknown},
                              **{r: st.strikes.get(r, 0) + 1 for r in over}}
                need = 1 if st.state == "probation" else c.patience
                due = {r: ratio for r, ratio in over.items()
                       if ratio >= c.immediate_ratio or st.strikes[r] >= need}
                if due:
                    reason = max(due, key=due.get)
                    st.state, st.checks_in_state, st.strikes = "bf16", 0, {}
                    st.failures += 1
                    st.sensitivity = due[reason]
                    decisions.append(Decision(name, "bf16", reason, s))
                    continue
                st.checks_in_state += 1
                if st.state == "probation" and st.checks_in_state >= c.probation_checks:
                    st.state, st.checks_in_state = "fp8", 0
            else:  # bf16 after a promotion
                st.checks_in_state += 1
                cooldown = min(c.max_cooldown_checks, c.cooldown_checks * c.backoff ** max(0, st.failures - 1))
                if st.checks_in_state >= cooldown:
                    if c.preflight and not self.preflight_passes(s):
                        st.preflight_holds += 1
                        continue
                    st.state, st.checks_in_state, st.strikes = "probation", 0, {}
                    decisions.append(Decision(name, "fp8", "probation", s))
        decisions += self._enforce_budget(flops_per_token, signals)
        return decisions

    def _enforce_budget(self, flops_per_token: dict[str, int], signals: dict[str, dict]) -> list[Decision]:
        total = sum(flops_per_token.values())
        in_bf16 = lambda n: self.layers[n].state == "bf16" or self.pinned.get(n) == "bf16" \
            or self.layers[n].hold == "bf16"  # noqa: E731
        share = sum(f for n, f in flops_per_token.items() if in_bf16(n)) / total if total else 0.0
        out = []
        movable = sorted((n for n, st in self.layers.items()
                          if st.state == "bf16" and st.hold is None and n not in self.pinned
                          and st.sensitivity != float("inf")), key=lambda n: self.layers[n].sensitivity)
        for name in movable:
            if share <= self.config.max_bf16_flop_fraction + 1e-12:
                break
            st = self.layers[name]
            st.state, st.checks_in_state, st.strikes = "probation", 0, {}
            share -= flops_per_token[name] / total
            out.append(Decision(name, "fp8", "budget", signals.get(name, {})))
        return out

    # ----------------------------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict:
        return {n: asdict(st) for n, st in self.layers.items()}

    def load_state_dict(self, sd: dict) -> None:
        for name, fields in sd.items():
            if name not in self.layers:
                raise ValueError(f"policy state names unknown layer {name!r}")
            self.layers[name] = LayerState(**fields)
