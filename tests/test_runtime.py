"""PrecisionRuntime on a real megatron-core GPT: host syncs, control file, switch log, manual overrides."""

import json

import pytest
import torch

from precisionrt.observe.events import GEMMS, read_log
from precisionrt.models.gpt import ModelConfig, build_gpt
from precisionrt.runtime.monitors import MonitorConfig
from precisionrt.runtime.precision_runtime import PrecisionRuntime, RuntimeConfig
from precisionrt.train import lm_loss


def small(num_layers):
    torch.manual_seed(0)
    return build_gpt(ModelConfig(num_layers=num_layers, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                 seq_length=32, vocab_size=256))


def tokens(step):
    return torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(step))


def train_steps(model, rt, steps, skip_check=False):
    # SGD: torch's single-tensor AdamW reads each parameter's step counter on the host, which would hide
    # what this file measures (the model's and the runtime's own transfers).
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    for step in range(1, steps + 1):
        yield step
        lm_loss(model, tokens(step)).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not (skip_check and rt.should_skip_step(norm)):
            opt.step()
        opt.zero_grad()
        rt.end_step(step)


class SyncCounter:
    """Counts device->host transfers by wrapping the Tensor methods that make them (``numpy()`` is not one:
    it refuses device tensors, so it only ever follows a counted ``cpu()``)."""

    METHODS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def wrapped(t, *a, _original=original, **k):
                self.count += 1
                return _original(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("skip_check", [False, True])
def test_host_syncs_do_not_grow_with_layers(parallel, monkeypatch, skip_check):
    per_size = {}
    for num_layers in (1, 3):
        model = small(num_layers)
        rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic", monitor=MonitorConfig(check_interval=3,
                                                                                         shadow_every=2)))
        counter = SyncCounter(monkeypatch)
        counts, last = [], 0
        for _ in train_steps(model, rt, 6, skip_check):
            counts.append(counter.count - last)
            last = counter.count
        counts = counts[1:] + [counter.count - last]   # per step 1..6
        monkeypatch.undo()
        per_size[num_layers] = counts
    expected = [int(skip_check) + (step % 3 == 0) for step in range(1, 7)]
    assert per_size[1] == per_size[3] == expected, per_size


def test_control_file_overrides_and_rejects_unknown_layers(parallel, tmp_path, caplog):
    model = small(2)
    rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic", monitor=MonitorConfig(check_interval=2)),
                          run_dir=tmp_path)
    control = tmp_path / "precision_control.json"
    target = "decoder.layers.1.mlp.linear_fc2"
    steps = train_steps(model, rt, 8)
    for step in steps:
        if step == 3:
            control.write_text(json.dumps({target: "bf16", "decoder.layers.9.*": "bf16", "*.linear_qkv": "fp16"}))
        if step == 6:
            control.write_text("{not json")
    assert rt.precisions()[target] == "bf16" and all(rt.policy.layers[f"{target}:{g}"].hold == "bf16" for g in GEMMS)
    assert sum(p == "bf16" for p in rt.precisions().values()) == 1
    err = caplog.text
    assert "'decoder.layers.9.*' matches no managed layer" in err and "'fp16' is not one of" in err
    assert "precision_control.json" in err and len(rt.control_rejected) == 3
    control.write_text(json.dumps({target: "auto"}))
    for _ in train_steps(model, rt, 2):
        pass
    assert all(rt.policy.layers[f"{target}:{g}"].hold is None for g in GEMMS)
    rt.close(10)
    log = read_log(tmp_path / "precision_events.jsonl")
    switches = [r for r in log.records if r["kind"] == "switch"]
    assert [(r["step"], r["layer"], r["gemm"], r["from"], r["to"], r["reason"]) for r in switches] == \
        [(4, target, g, "fp8", "bf16", "manual") for g in GEMMS]
    assert log.skipped_lines == 0 and log.records[-1]["kind"] == "run_end"


def test_manual_api_and_pins(parallel, tmp_path):
    model = small(2)
    rt = PrecisionRuntime(model, RuntimeConfig(mode="fp8", pin_bf16=["decoder.layers.0.*"]))
    assert {n for n, p in rt.precisions().items() if p == "bf16"} == {n for n in rt.names if ".layers.0." in n}
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        rt.set_precision("nope", "bf16")
    with pytest.raises(ValueError, match="pinned to bf16"):
        rt.set_precision("decoder.layers.0.mlp.linear_fc1", "fp8")
    events = rt.set_precision("decoder.layers.1.mlp.linear_fc1", "bf16")
    assert [e.summary() for e in events] == [{"step": -1, "layer": "decoder.layers.1.mlp.linear_fc1", "gemm": g,
                                              "from": "fp8", "to": "bf16", "reason": "manual"} for g in GEMMS]
    assert rt.set_precision("decoder.layers.1.mlp.linear_fc1", "bf16") == []
    # one GEMM: the layer reads "mixed", its other GEMMs keep their precision, and the FLOP share counts thirds
    [e] = rt.set_precision("decoder.layers.1.mlp.linear_fc2:wgrad", "bf16")
    assert (e.layer, e.gemm, e.to) == ("decoder.layers.1.mlp.linear_fc2", "wgrad", "bf16")
    assert rt.precisions()["decoder.layers.1.mlp.linear_fc2"] == "mixed"
    assert rt.gemm_precisions()["decoder.layers.1.mlp.linear_fc2"] == {"fprop": "fp8", "dgrad": "fp8", "wgrad": "bf16"}
    with pytest.raises(ValueError, match="'backward' is not a GEMM"):
        rt.set_precision("decoder.layers.1.mlp.linear_fc2:backward", "bf16")
    share = rt.fp8_flop_fraction()
    flops = {n: l.gemm_flops_per_token for n, l in rt.layers.items()}
    fp8_thirds = {n: sum(p == "fp8" for p in g.values()) / 3 for n, g in rt.gemm_precisions().items()}
    assert share == pytest.approx(sum(f * fp8_thirds[n] for n, f in flops.items()) / sum(flops.values()))


def test_fp8_flop_fraction_counts_what_ran(parallel):
    model = small(1)
    rt = PrecisionRuntime(model, RuntimeConfig(mode="fp8"))
    steps = train_steps(model, rt, 4)
    for step in steps:
        if step == 3:
            rt.set_precision("decoder.layers.0.mlp.linear_fc1", "bf16")
    flops = {n: l.gemm_flops_per_token for n, l in rt.layers.items()}
    fc1 = flops["decoder.layers.0.mlp.linear_fc1"] / sum(flops.values())
    assert rt.fp8_flop_fraction() == pytest.approx(1 - fc1 * 2 / 4)
    assert rt.fp8_flop_fraction("step") == pytest.approx(1 - fc1)


def test_a_dist_checkpoint_of_another_model_is_refused_by_name(small_model, parallel):
    """What ``dist_checkpointing.load`` hands back for ``sharded_state_dict()`` (each ShardedObject replaced by its
    data) loads into the same model, and is refused, naming a layer, by a model with other layers."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rt = PrecisionRuntime(small_model, RuntimeConfig(mode="dynamic"))
    rt.set_precision("decoder.layers.1.mlp.linear_fc1", "bf16")
    loaded = {k: v.data if isinstance(v, ShardedObject) else v for k, v in rt.sharded_state_dict().items()}
    again = PrecisionRuntime(small_model, RuntimeConfig(mode="dynamic"))
    again.load_sharded_state_dict(loaded)
    assert again.precisions() == rt.precisions() and again.precisions()["decoder.layers.1.mlp.linear_fc1"] == "bf16"
    torch.manual_seed(0)
    deeper = PrecisionRuntime(build_gpt(ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4,
                                                    ffn_hidden_size=128)), RuntimeConfig(mode="dynamic"))
    with pytest.raises(ValueError, match="missing \\['decoder.layers.2"):
        deeper.load_sharded_state_dict(loaded)
