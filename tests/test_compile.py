"""``torch.compile`` of a converted model (issue 25, item 1), on the CPU with ``backend="aot_eager"`` (the traced
graph run by eager kernels, so compiled and eager must agree bit for bit).

* No graph break in forward or backward (``fullgraph=True``) in ``fp8``, ``bf16`` and ``dynamic`` mode.
* Compiled training steps equal eager ones bit for bit: loss, every gradient, every scale and statistics buffer,
  the runtime's decisions, over steps that include checks, sampled full-statistics steps and a shadow step.
* A precision switch compiles one new graph for the block that holds the layer; switching back compiles
  nothing; ordinary steps never compile (``torch._dynamo`` counters).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

from precisionrt.distributed.compile import compile_model, transformer_blocks
from precisionrt.layers.linear import precision_layers
from precisionrt.models.gpt import ModelConfig, build_gpt
from precisionrt.runtime.precision_runtime import PrecisionRuntime, RuntimeConfig

TINY = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, seq_length=16,
                   vocab_size=64)
LAYER = "decoder.layers.1.mlp.linear_fc1"


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, TINY.vocab_size, (2, TINY.seq_length + 1), generator=g) for _ in range(n)]


def _setup(mode: str):
    torch.manual_seed(0)
    model = build_gpt(TINY)
    runtime = PrecisionRuntime(model, RuntimeConfig(mode=mode))
    return model, runtime, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _loss(model):
    def loss(tokens: torch.Tensor) -> torch.Tensor:
        inputs = tokens[:, :-1]
        positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
        return model(inputs, positions, None, labels=tokens[:, 1:]).float().mean()
    return loss


@pytest.fixture(autouse=True)
def fresh_dynamo(parallel):
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


@pytest.mark.parametrize("mode", ["fp8", "bf16", "dynamic"])
def test_the_model_compiles_without_a_graph_break(mode):
    model, runtime, _ = _setup(mode)
    runtime.sampling.plan(10)   # a sampled step: full statistics and a shadow layer, the heaviest graph
    explained = dynamo.explain(_loss(model))(_batches(1)[0])
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    compiled = torch.compile(_loss(model), fullgraph=True, backend="aot_eager")   # a break would raise
    compiled(_batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())


def _train(model, runtime, optimizer, loss, batches, switches=()):
    record = []
    for step, tokens in enumerate(batches, start=1):
        for at, precision in switches:
            if at == step:
                runtime.set_precision(LAYER, precision)
        value = loss(tokens)
        value.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        events = runtime.end_step(step)
        layers = precision_layers(model).values()
        record.append({"loss": value.detach(), "grads": grads,
                       "scales": [s.scale.clone() for l in layers for s in l.numerics.scaling.values()],
                       "history": [s.amax_history.clone() for l in layers for s in l.numerics.scaling.values()],
                       "stats": [l.numerics.stats.clone() for l in layers],
                       "events": [(e.layer, e.to, e.reason) for e in events],
                       "precision": runtime.precisions()[LAYER]})
    return record


def test_compiled_steps_equal_eager_bit_for_bit():
    """Dynamic mode, monitors on, 12 steps: a check and a sampled step (full statistics, a shadow layer) at 10,
    and a switch of one layer to BF16 and back."""
    batches, switches = _batches(12), [(4, "bf16"), (8, "fp8")]
    model, runtime, optimizer = _setup("dynamic")
    eager = _train(model, runtime, optimizer, _loss(model), batches, switches)
    model, runtime, optimizer = _setup("dynamic")
    compiled = _train(model, runtime, optimizer, torch.compile(_loss(model), fullgraph=True, backend="aot_eager"),
                      batches, switches)
    for step, (e, c) in enumerate(zip(eager, compiled), start=1):
        assert torch.equal(e["loss"], c["loss"]), step
        for key in ("grads", "scales", "history", "stats"):
            assert all(torch.equal(a, b) for a, b in zip(e[key], c[key])), (step, key)
        assert e["events"] == c["events"], step
        assert e["precision"] == c["precision"], step
    assert [e["precision"] for e in eager] == ["fp8"] * 3 + ["bf16"] * 4 + ["fp8"] * 5


def test_a_switch_recompiles_one_block_once_and_a_return_nothing():
    model, runtime, optimizer = _setup("fp8")
    compile_model(model, "block", backend="aot_eager")
    loss, graphs = _loss(model), []
    for step, tokens in enumerate(_batches(12), start=1):
        if step == 5:
            runtime.set_precision(LAYER, "bf16")
        if step == 9:
            runtime.set_precision(LAYER, "fp8")
        loss(tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        runtime.end_step(step)
        graphs.append(counters["stats"]["unique_graphs"])
    # both blocks share one graph; the switched block gets a second one; returning reuses the first
    assert graphs == [1] * 4 + [2] * 8, graphs
    assert len(transformer_blocks(model)) == 2


def test_dynamic_mode_compiles_each_state_once_and_no_ordinary_step():
    """Dynamic mode per block: a graph per (block precisions, statistics level) the run meets, each once. The
    ordinary steps between sampled ones compile nothing; after a switch, the switched block compiles its new
    variant at its first ordinary step and at its first sampled step, and no other block compiles."""
    model, runtime, optimizer = _setup("dynamic")
    compile_model(model, "block", backend="aot_eager")
    loss, graphs = _loss(model), []
    sampled = set()
    for step, tokens in enumerate(_batches(22), start=1):
        if step == 12:
            runtime.set_precision(LAYER, "bf16")
        if any(l.numerics.full_stats for l in precision_layers(model).values()):
            sampled.add(step)
        loss(tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        runtime.end_step(step)
        graphs.append(counters["stats"]["unique_graphs"])
    new = {step: graphs[step - 1] - (graphs[step - 2] if step > 1 else 0) for step in range(1, 23)}
    compiling = {step for step, n in new.items() if n}
    assert compiling <= {1, 12} | sampled, (compiling, sampled)
    assert new[12] == 1, "the switch: one new graph, for the switched block"
    assert sum(new[s] for s in range(13, 23) if s not in sampled) == 0, "ordinary steps after it compile nothing"
