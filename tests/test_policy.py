"""The promotion state machine, driven with hand-made signals."""

import pytest

from precisionrt.config import ConfigError, from_dict
from precisionrt.runtime.policy import Policy, PolicyConfig

LAYERS = ["a", "b", "c"]
FLOPS = {"a": 100, "b": 200, "c": 700}
OK = {"overflow": 0.0, "underflow": 0.0, "underflow_energy_fwd": 0.0, "underflow_energy_grad": 0.0,
      "quant_error": 0.03, "nonfinite": 0.0}


def make(**cfg):
    cfg.setdefault("underflow", 0.05)   # these tests drive the state machine with the count signal
    return Policy(PolicyConfig(**cfg), LAYERS, pinned={}, initial={n: "fp8" for n in LAYERS})


def check(policy, **per_layer):
    signals = {n: {**OK, **per_layer.get(n, {})} for n in LAYERS}
    return [(d.layer, d.to, d.reason) for d in policy.decide(signals, FLOPS)]


def test_hysteresis_needs_consecutive_checks():
    p = make(patience=3)
    bad = {"underflow": 0.2}
    assert check(p, a=bad) == [] and check(p, a=bad) == []
    assert check(p) == [], "a clean check resets the count"
    assert check(p, a=bad) == [] and check(p, a=bad) == []
    assert check(p, a=bad) == [("a", "bf16", "underflow")]


def test_windows_without_exact_statistics_keep_strikes():
    p = make(patience=2)
    assert check(p, a={"underflow": 0.2}) == []
    assert check(p, a={"underflow": None, "overflow": None, "quant_error": None}) == [], "unknown: no change"
    assert check(p, a={"underflow": 0.2}) == [("a", "bf16", "underflow")]


def test_nonfinite_and_severe_signals_act_at_once():
    p = make(patience=5)
    assert check(p, b={"nonfinite": 3.0, "nonfinite_origin": True}) == [("b", "bf16", "nonfinite")]
    assert check(p, a={"nonfinite": 3.0, "nonfinite_origin": False}) == [], "only the origin is promoted"
    assert check(p, c={"overflow": 0.5}) == [("c", "bf16", "overflow")], "500x the threshold"


def test_cooldown_probation_and_backoff():
    p = make(patience=1, cooldown_checks=2, backoff=2.0, probation_checks=2)
    assert check(p, a={"quant_error": 0.5}) == [("a", "bf16", "quant_error")]
    assert check(p) == []
    assert check(p) == [("a", "fp8", "probation")], "after 2 checks in bf16"
    assert check(p, a={"underflow": 0.1}) == [("a", "bf16", "underflow")], "probation fails on one check"
    assert p.layers["a"].failures == 2
    for _ in range(3):
        assert check(p) == [], "second cooldown is twice as long"
    assert check(p) == [("a", "fp8", "probation")]
    check(p), check(p)
    assert p.layers["a"].state == "fp8", "two clean checks end probation"


def test_preflight_holds_a_return_until_dry_run_statistics_are_clean():
    p = make(patience=1, cooldown_checks=2)
    assert check(p, a={"underflow": 0.9}) == [("a", "bf16", "underflow")]
    assert check(p, a={"underflow": 0.9}) == []
    assert check(p, a={"underflow": 0.9}) == [], "cooldown over, but the layer would still underflow in FP8"
    assert check(p, a={"underflow": None}) == [], "unknown (no exact statistics in the window): keep waiting"
    assert p.layers["a"].state == "bf16" and p.layers["a"].preflight_holds == 2
    assert check(p) == [("a", "fp8", "probation")], "returns at the first clean dry run"
    assert p.layers["a"].failures == 1, "a held return is not a failure"
    q = make(patience=1, cooldown_checks=1, preflight=False)
    check(q, a={"underflow": 0.9})
    assert check(q, a={"underflow": 0.9}) == [("a", "fp8", "probation")], "pre-flight off: plain cooldown"


def test_grad_sensitivity_triggers_on_error_or_cosine():
    p = make(patience=1)
    assert check(p, a={"grad_rel_err": 0.5}) == [("a", "bf16", "grad_sensitivity")]
    assert check(p, b={"grad_rel_err": 0.1, "grad_cos": 0.5}) == [("b", "bf16", "grad_sensitivity")]
    assert check(p, c={"grad_rel_err": None, "grad_cos": None}) == [], "no shadow this window"


def test_pinned_and_held_layers_do_not_move():
    p = Policy(PolicyConfig(patience=1, underflow=0.05), LAYERS, pinned={"a": "fp8"}, initial={n: "fp8" for n in LAYERS})
    p.hold("b", "fp8")
    assert check(p, a={"underflow": 0.5}, b={"underflow": 0.5}) == []
    p.hold("b", None)
    assert check(p, b={"underflow": 0.5}) == [("b", "bf16", "underflow")]


def test_budget_returns_least_sensitive_layers_first():
    p = make(patience=1, max_bf16_flop_fraction=0.25)
    # a (10% of FLOPs) barely over, b (20%) far over: 30% > 25%, so a goes back first
    out = check(p, a={"underflow": 0.06}, b={"underflow": 0.4})
    assert out == [("a", "bf16", "underflow"), ("b", "bf16", "underflow"), ("a", "fp8", "budget")]
    assert p.layers["a"].state == "probation" and p.layers["b"].state == "bf16"


def test_state_round_trips():
    p = make(patience=1)
    check(p, a={"underflow": 0.5})
    q = make(patience=1)
    q.load_state_dict(p.state_dict())
    assert q.state_dict() == p.state_dict()
    with pytest.raises(ValueError, match="'zzz'"):
        q.load_state_dict({"zzz": {}})


@pytest.mark.parametrize("bad, message", [
    ({"overflow": -1.0}, r"precision.policy.overflow: must be in \[0, 1\]"), ({"underflow": 2.0}, "underflow"),
    ({"grad_cos": 1.5}, "grad_cos"), ({"patience": 0}, "patience"), ({"max_bf16_flop_fraction": 1.2}, "max_bf16_flop_fraction"),
])
def test_out_of_range_thresholds_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(PolicyConfig, bad, prefix="precision.policy.")
