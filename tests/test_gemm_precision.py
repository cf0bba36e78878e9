"""Precision per GEMM (fprop, dgrad, wgrad): the layer quantizes only what an FP8 GEMM reads, each GEMM's result is
the one its precision gives, a returning operand starts from fresh scaling, the runtime decides per GEMM from the
operands' signals, and a fault in the backward pass (``grad_outlier``) moves dgrad and wgrad only."""

import itertools
import json

import pytest
import torch

from precisionrt.config import ConfigError
from precisionrt.distributed.cuda_graphs import graph_key
from precisionrt.layers.linear import LayerNumerics, PrecisionLinearFunction
from precisionrt.numerics import fp8
from precisionrt.numerics.fp8 import ScalingConfig
from precisionrt.observe.analysis import summarize
from precisionrt.observe.events import GEMMS, read_log
from precisionrt.run.inject import FaultInjector, InjectConfig
from precisionrt.runtime.monitors import MonitorConfig
from precisionrt.runtime.policy import PolicyConfig
from precisionrt.runtime.precision_runtime import PrecisionRuntime, RuntimeConfig
from precisionrt.train import lm_loss

from test_runtime import small, tokens

ASSIGNMENTS = list(itertools.product(("fp8", "bf16"), repeat=3))


def run_linear(precisions, x, w, g, recipe="current", grad_scale=None):
    numerics = LayerNumerics(ScalingConfig(recipe=recipe), "cpu")
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = PrecisionLinearFunction.apply(x, w, None, numerics, precisions, False, False, None, grad_scale)
    y.backward(g)
    return {"fprop": y.detach(), "dgrad": x.grad, "wgrad": w.grad}, numerics


def operands():
    torch.manual_seed(0)
    return torch.randn(48, 64), torch.randn(80, 64) * 0.05, torch.randn(48, 80) * 1e-3


@pytest.mark.parametrize("assignment", ASSIGNMENTS, ids=lambda a: "-".join(a))
def test_each_gemm_computes_what_its_precision_computes(assignment):
    """Every GEMM's result, bit for bit, is the one the all-FP8 or the all-BF16 layer computes for it: the
    precision of one GEMM does not leak into another's."""
    x, w, g = operands()
    ref = {p: run_linear(p, x, w, g)[0] for p in ("fp8", "bf16")}
    out, _ = run_linear(assignment, x, w, g)
    for gemm, precision in zip(GEMMS, assignment):
        assert torch.equal(out[gemm], ref[precision][gemm]), f"{gemm} in {precision}"
    assert not torch.equal(ref["fp8"]["fprop"], ref["bf16"]["fprop"]), "the two precisions really differ"


@pytest.mark.parametrize("assignment,quantized", [
    (("fp8", "fp8", "fp8"), {"input", "weight", "grad_output"}),
    (("fp8", "bf16", "bf16"), {"input", "weight"}),
    (("bf16", "fp8", "bf16"), {"weight", "grad_output"}),
    (("bf16", "bf16", "fp8"), {"input", "grad_output"}),
    (("bf16", "bf16", "bf16"), set()),
])
def test_only_operands_an_fp8_gemm_reads_are_quantized(monkeypatch, assignment, quantized):
    x, w, g = operands()
    seen = []
    original = fp8.quantize_tensor

    def spy(t, state, *args, **kwargs):
        seen.append({(48, 64): "input", (80, 64): "weight", (48, 80): "grad_output"}[tuple(t.shape)])
        return original(t, state, *args, **kwargs)
    monkeypatch.setattr(fp8, "quantize_tensor", spy)
    run_linear(assignment, x, w, g)
    assert sorted(seen) == sorted(quantized), "each quantized operand once, the others never"


def test_an_operand_returning_to_fp8_starts_from_fresh_scaling(small_model):
    """Delayed scaling: taking fprop and wgrad to BF16 leaves the input unquantized; when one returns, the
    input's amax history starts empty, while the weight (dgrad kept it in FP8 meanwhile) keeps its history."""
    layer = small_model.decoder.layers[0].mlp.linear_fc1
    layer.numerics = LayerNumerics(ScalingConfig(recipe="delayed"), "cpu")
    layer.precision = "fp8"
    small_model.train()
    lm_loss(small_model, tokens(1)).backward()
    hist = lambda role: int(layer.numerics.scaling[role].history_filled.item())  # noqa: E731
    assert hist("input") == hist("weight") == 1
    layer.set_gemm_precisions({"fprop": "bf16", "wgrad": "bf16"})
    lm_loss(small_model, tokens(2)).backward()
    assert hist("weight") == 2 and hist("input") == 1, "the input is not quantized while no FP8 GEMM reads it"
    layer.set_gemm_precisions({"wgrad": "fp8"})
    assert hist("input") == 0 and hist("weight") == 2, "the returning input starts fresh, the weight does not"


def test_grad_outlier_preserves_bf16_exactly_and_troubles_only_the_gradient():
    x, w, g = operands()
    scale = torch.ones(80)
    scale[3] = 2.0 ** 40
    clean, _ = run_linear("bf16", x, w, g)
    faulted, _ = run_linear("bf16", x, w, g, grad_scale=scale)
    for gemm in GEMMS:
        assert torch.equal(clean[gemm], faulted[gemm]), f"BF16 {gemm} changed under the injection"
    _, fp8_clean = run_linear("fp8", x, w, g)
    _, fp8_faulted = run_linear("fp8", x, w, g, grad_scale=scale)
    roles = {"input": 0, "weight": 1, "grad_output": 2}
    flushed = fp8.STAT_INDEX["flushed_energy"]
    for role in ("input", "weight"):   # the forward operands see nothing
        assert torch.equal(fp8_clean.stats[roles[role]], fp8_faulted.stats[roles[role]]), role
    grad_clean = fp8_clean.stats[2, flushed] / fp8_clean.stats[2, fp8.STAT_INDEX["weighted_signal"]]
    grad_faulted = fp8_faulted.stats[2, flushed] / fp8_faulted.stats[2, fp8.STAT_INDEX["weighted_signal"]]
    assert grad_clean < 1e-3 < 0.5 < grad_faulted, (grad_clean, grad_faulted)


def lm_run(rt, model, steps, injector=None):
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    events = []
    for step in range(1, steps + 1):
        if injector is not None:
            injector.before_step(step - 1)
        lm_loss(model, tokens(step)).backward()
        rt.optimizer_step(opt, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), step)
        events += rt.end_step(step)
    return events


TARGET = "decoder.layers.1.mlp.linear_fc2"


@pytest.mark.parametrize("granularity", ["gemm", "layer"])
def test_grad_outlier_promotes_dgrad_and_wgrad_per_gemm_and_the_layer_per_layer(parallel, tmp_path, granularity):
    model = small(2)
    rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic", monitor=MonitorConfig(check_interval=2,
                                                                                     full_stats_every=1),
                                               policy=PolicyConfig(granularity=granularity)), run_dir=tmp_path)
    inject = FaultInjector(InjectConfig(kind="grad_outlier", layer=TARGET, start_step=2, factor=1e12,
                                        channels=[3]), model)
    events = lm_run(rt, model, 8, inject)
    rt.close(8)
    moved = {(e.layer, e.gemm) for e in events}
    if granularity == "gemm":
        assert moved == {(TARGET, "dgrad"), (TARGET, "wgrad")}, moved
        assert rt.gemm_precisions()[TARGET] == {"fprop": "fp8", "dgrad": "bf16", "wgrad": "bf16"}
        assert rt.precisions()[TARGET] == "mixed"
    else:
        assert moved == {(TARGET, g) for g in GEMMS}, moved
        assert rt.precisions()[TARGET] == "bf16"
    assert all(p == "fp8" for n, p in rt.precisions().items() if n != TARGET), "no other layer moves"
    switches = [r for r in read_log(tmp_path / "precision_events.jsonl").records if r["kind"] == "switch"]
    assert {(r["layer"], r["gemm"]) for r in switches} == moved and all(r["v"] == 2 for r in switches)
    [run] = summarize([tmp_path])["runs"]
    assert run["promotions"] == 1, "one decision, whatever the GEMMs it moved"
    assert run["layers"][TARGET]["gemms"]["fprop"]["final_precision"] == ("fp8" if granularity == "gemm" else "bf16")


def test_a_healthy_run_moves_nothing_at_either_granularity(parallel):
    for granularity in ("gemm", "layer"):
        model = small(2)
        rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic", monitor=MonitorConfig(check_interval=2,
                                                                                         full_stats_every=1),
                                                   policy=PolicyConfig(granularity=granularity)))
        assert lm_run(rt, model, 6) == []


def test_pins_name_gemms_and_a_bad_gemm_is_refused_by_name(parallel):
    model = small(2)
    rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic", pin_bf16=[f"{TARGET}:wgrad"]))
    assert rt.gemm_precisions()[TARGET] == {"fprop": "fp8", "dgrad": "fp8", "wgrad": "bf16"}
    assert sum(p != "fp8" for p in rt.precisions().values()) == 1
    assert rt.layer_table()[[i["name"] for i in rt.layer_table()].index(TARGET)]["gemm_pins"] == {"wgrad": "bf16"}
    with pytest.raises(ValueError, match="'bwd' is not a GEMM"):
        PrecisionRuntime(model, RuntimeConfig(mode="dynamic", pin_bf16=[f"{TARGET}:bwd"]))
    # the FLOP share counts the pinned GEMM's third of the layer
    flops = {n: l.gemm_flops_per_token for n, l in rt.layers.items()}
    lm_run(rt, model, 1)
    assert rt.fp8_flop_fraction() == pytest.approx(1 - flops[TARGET] / 3 / sum(flops.values()))


def test_per_gemm_state_resumes_exactly_and_an_old_checkpoint_loads(parallel):
    model = small(2)
    rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic"))
    rt.set_precision(f"{TARGET}:dgrad", "bf16")
    sd = rt.state_dict()
    again = PrecisionRuntime(small(2), RuntimeConfig(mode="dynamic"))
    again.load_state_dict(sd)
    assert again.gemm_precisions() == rt.gemm_precisions()
    assert again.policy.layers[f"{TARGET}:dgrad"].hold == "bf16"
    # a checkpoint from before per-GEMM precision: one precision and one policy state per layer
    old = {**sd, "precisions": {n: ("bf16" if n == TARGET else "fp8") for n in rt.names},
           "policy": {n: {**sd["policy"][f"{n}:fprop"], "state": "bf16" if n == TARGET else "fp8"} for n in rt.names}}
    del old["granularity"]
    third = PrecisionRuntime(small(2), RuntimeConfig(mode="dynamic"))
    third.load_state_dict(old)
    assert third.gemm_precisions()[TARGET] == dict.fromkeys(GEMMS, "bf16")
    assert all(third.policy.layers[f"{TARGET}:{g}"].state == "bf16" for g in GEMMS)


def test_graph_keys_tell_gemm_states_apart(parallel):
    model = small(1)
    rt = PrecisionRuntime(model, RuntimeConfig(mode="fp8"))
    for layer in rt.layers.values():
        layer.numerics.full_stats = False
    before = graph_key(rt)
    rt.set_precision(f"{TARGET.replace('.1.', '.0.')}:wgrad", "bf16")
    assert graph_key(rt) != before


def speed_table(path, device, ms_of):
    """A speed table where ``ms_of(layer kind, assignment)`` gives each time."""
    shapes = {"linear_qkv": (64, 192), "linear_proj": (64, 64), "linear_fc1": (64, 256), "linear_fc2": (128, 64)}
    table = {"version": 1, "device": device, "tokens": 128, "shapes": [
        {"k": k, "n": n, "layers": [kind], "ms": {",".join(f"{g}={p}" for g, p in zip(GEMMS, a)): ms_of(kind, a)
                                                 for a in ASSIGNMENTS}} for kind, (k, n) in shapes.items()]}
    path.write_text(json.dumps(table))
    return path


def test_speed_plan_keeps_fp8_where_it_wins_and_stability_still_acts(parallel, tmp_path):
    from precisionrt.runtime.speed_plan import device_name

    def ms(kind, a):   # FP8 halves each GEMM of fc1 and fc2, and slows qkv's and proj's
        return sum((0.5 if kind in ("linear_fc1", "linear_fc2") else 1.5) if p == "fp8" else 1.0 for p in a)
    table = speed_table(tmp_path / "table.json", device_name("cpu"), ms)
    model = small(2)
    rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic", plan="speed", speed_table=str(table),
                                               monitor=MonitorConfig(check_interval=2, full_stats_every=1)),
                          run_dir=tmp_path)
    for name, p in rt.precisions().items():
        assert p == ("fp8" if name.endswith(("fc1", "fc2")) else "bf16"), name
    entry = next(i for i in rt.layer_table() if i["name"].endswith("layers.0.self_attention.linear_qkv"))
    assert entry["gemm_pins"] == dict.fromkeys(GEMMS, "bf16") and set(entry["pin_reasons"].values()) == {"speed"}
    predicted = rt.speed_plan.predicted()
    assert predicted["plan"] == pytest.approx(2 * (3 + 3 + 1.5 + 1.5)) and predicted["bf16"] == pytest.approx(24)
    inject = FaultInjector(InjectConfig(kind="outlier", layer=TARGET, start_step=2, factor=1e6), model)
    events = lm_run(rt, model, 6, inject)
    assert {e.layer for e in events} == {TARGET} and all(e.to == "bf16" for e in events), "stability still acts"


def test_speed_tables_of_another_device_or_shape_are_refused_by_name(parallel, tmp_path):
    model = small(2)
    other = speed_table(tmp_path / "other.json", "cuda: NVIDIA H100 80GB HBM3", lambda k, a: 1.0)
    with pytest.raises(ConfigError, match="was measured on 'cuda: NVIDIA H100 80GB HBM3'"):
        PrecisionRuntime(model, RuntimeConfig(plan="speed", speed_table=str(other)))
    from precisionrt.runtime.speed_plan import device_name

    partial = json.loads(speed_table(tmp_path / "p.json", device_name("cpu"), lambda k, a: 1.0).read_text())
    partial["shapes"] = partial["shapes"][:3]
    (tmp_path / "p.json").write_text(json.dumps(partial))
    with pytest.raises(ConfigError, match=r"no entry for layer .*linear_fc2 \(K=128, N=64\)"):
        PrecisionRuntime(model, RuntimeConfig(plan="speed", speed_table=str(tmp_path / "p.json")))
    with pytest.raises(ConfigError, match="needs precision.speed_table"):
        PrecisionRuntime(model, RuntimeConfig(plan="speed"))


def test_the_measured_table_is_honoured(parallel, tmp_path):
    """The command's own table on this CPU: the plan runs, per layer, the fastest assignment it measured."""
    from precisionrt import speed
    from precisionrt.runtime.speed_plan import assignment_key

    config = tmp_path / "lm.toml"
    config.write_text('[model]\nnum_layers = 2\nhidden_size = 64\nnum_attention_heads = 4\nffn_hidden_size = 128\n'
                      'seq_length = 32\nvocab_size = 256\n[run]\ndevice = "cpu"\n')
    assert speed.main(["--config", str(config), "--out", str(tmp_path / "t.json"), "--tokens", "64",
                       "--repeats", "3", "--warmup", "1"]) == 0
    table = json.loads((tmp_path / "t.json").read_text())
    rt = PrecisionRuntime(small(2), RuntimeConfig(plan="speed", speed_table=str(tmp_path / "t.json"),
                                                  speed_margin=0.0))
    by_shape = {(e["k"], e["n"]): e["ms"] for e in table["shapes"]}
    for info in rt.table.infos:
        ms = by_shape[info.shape]
        fastest = min(ASSIGNMENTS, key=lambda a: ms[assignment_key(a)])
        assert tuple(rt.gemm_precisions()[info.name].values()) == fastest, info.name
