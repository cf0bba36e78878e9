"""CUDA-graph capture of ordinary steps (issue 25, item 2): the logic that runs on any machine.

Which steps replay, capture or run eagerly (``GraphPlan``), and what a graph depends on (``graph_key``): an
ordinary step's key stays the same from step to step, a precision switch changes it and a return restores it,
and sampled steps, injected channel scalings and evaluation never share a graph with ordinary training steps.
The capture itself is tested on CUDA (``tests/test_cuda.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from precisionrt.distributed.cuda_graphs import CapturedStep, GraphPlan, graph_key
from precisionrt.models.gpt import ModelConfig, build_gpt
from precisionrt.runtime.precision_runtime import PrecisionRuntime, RuntimeConfig

LAYER = "decoder.layers.1.mlp.linear_fc1"


def test_the_plan_warms_up_captures_replays_and_keeps_the_recent_graphs():
    plan = GraphPlan(warmup=2, max_graphs=2)
    steps = []
    for key in ["A", "A", "A", "A", None, "A", "B", "B", "B", "B", "A", "C", "C", "C", "A", "B"]:
        decision = plan.decide(key)
        if decision == "capture":
            plan.keep(key, f"graph {key}")
        steps.append(decision[0])
    # A: 2 warm-ups, capture, replay; a sampled step; B likewise; A replays; C captured and B, the least recently
    # used, dropped: B starts over (its warm-ups were counted already, so it captures at once)
    assert "".join(steps) == "eecre" + "r" + "eecr" + "r" + "eec" + "r" + "c", "".join(steps)
    assert list(plan.graphs) == ["A", "B"]


def _runtime(parallel):
    torch.manual_seed(0)
    model = build_gpt(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                                  seq_length=16, vocab_size=64))
    return model, PrecisionRuntime(model, RuntimeConfig(mode="dynamic"))


def test_a_graph_key_changes_with_a_switch_and_never_covers_a_sampled_step(parallel):
    model, rt = _runtime(parallel)
    keys = {}
    for step in range(1, 13):
        rt.sampling.plan(step)
        keys[step] = graph_key(rt)
    assert keys[10] is None, "a sampled step (full statistics, a shadow layer) runs eagerly"
    assert len({k for s, k in keys.items() if s != 10}) == 1, "ordinary steps share one key"
    ordinary = keys[1]
    rt.set_precision(LAYER, "bf16")
    rt.sampling.plan(11)
    switched = graph_key(rt)
    assert switched is not None and switched != ordinary
    rt.set_precision(LAYER, "fp8")
    assert graph_key(rt) == ordinary, "a return finds the old graph"
    model.eval()
    assert graph_key(rt) not in (ordinary, None), "evaluation is another graph"
    model.train()
    rt.layers[LAYER].channel_scale = torch.ones(64)
    assert graph_key(rt) is None, "an injected channel scaling (its values change over a ramp) runs eagerly"


def test_off_cuda_every_step_runs_eagerly_and_computes_what_the_step_does(parallel):
    model, rt = _runtime(parallel)
    calls = []

    def step_fn(tokens):
        calls.append(tokens)
        inputs = tokens[:, :-1]
        positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
        loss = model(inputs, positions, None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        return loss

    step = CapturedStep(step_fn, rt, model.parameters())
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = step(tokens)
    assert not step.enabled and step.decisions == ["eager"] and calls == [tokens]
    assert loss.requires_grad and all(p.grad is not None for p in model.parameters())


def test_the_lm_command_refuses_cuda_graphs_where_they_cannot_run(tmp_path):
    import pytest

    from precisionrt.config import ConfigError, load_config
    from precisionrt.train import LMConfig, train

    if torch.cuda.is_available():
        pytest.skip("the refusal is for a machine without CUDA")
    config = Path(__file__).parent.parent / "configs/lm_tiny_cpu.toml"
    cfg = load_config(LMConfig, config, ["train.cuda_graphs=true", f'run.dir="{tmp_path}/run"'])
    with pytest.raises(ConfigError, match="train.cuda_graphs: needs run.device"):
        train(cfg)
    assert not (tmp_path / "run").exists()
