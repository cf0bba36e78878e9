"""Mixture-of-experts layers (issue 26, item 4): a megatron-core GPT with SequentialMLP experts, converted by
``convert_layer_spec``, trains on the CPU (``precisionrt.layers.moe.install``: megatron 0.16.1's router moves its
weight to CUDA and, without Transformer Engine, its gating raises NameError), and each expert's linears are
layers of their own: a fault in one expert promotes that expert's layer only."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_tensor_parallel import free_port

HERE = Path(__file__).parent

EXPERTS = 4


def _moe_model(**parallel):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from precisionrt import convert_layer_spec
    from precisionrt.layers import moe
    from precisionrt.models.transformer import megatron_transformer_config

    torch.manual_seed(0)
    spec = convert_layer_spec(get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False,
                                                       normalization="RMSNorm"), cpu_attention=True)
    config = megatron_transformer_config(
        "cpu", num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, normalization="RMSNorm",
        num_moe_experts=EXPERTS, moe_router_topk=2, moe_ffn_hidden_size=128, moe_token_dispatcher_type="allgather",
        params_dtype=torch.float32, **parallel)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=256, max_sequence_length=32,
                     position_embedding_type="learned_absolute")
    assert moe.install(model) == 2
    return model


def _train(model, runtime, injector, steps: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    switches = []
    for step in range(1, steps + 1):
        injector.before_step(step - 1)
        tokens = torch.randint(0, 256, (4, 17), generator=g)
        loss = model(tokens[:, :-1], torch.arange(16).expand(4, 16), None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        if not runtime.should_skip_step(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        switches += runtime.end_step(step)
    return switches


def test_router_gating_equals_megatrons_non_te_formula(parallel):
    """The installed gating is megatron's non-TE branch (``inp @ weight.T`` in the router dtype) and keeps the
    router on its device."""
    from megatron.core.transformer.moe.router import Router

    model = _moe_model()
    router = next(m for m in model.modules() if isinstance(m, Router))
    x = torch.randn(5, 64, dtype=torch.float64)
    assert torch.equal(router.gating(x), x @ router.weight.double().t())
    assert router.weight.device.type == "cpu"


@pytest.mark.parametrize("expert", [1, 3])
def test_a_fault_in_one_expert_promotes_that_expert_only(parallel, expert):
    from precisionrt import PrecisionRuntime, RuntimeConfig, ScalingConfig
    from precisionrt.run.inject import FaultInjector, InjectConfig
    from precisionrt.runtime.monitors import MonitorConfig

    model = _moe_model()
    runtime = PrecisionRuntime(model, RuntimeConfig(mode="dynamic", scaling=ScalingConfig(recipe="delayed",
                                                                                        amax_history_len=4),
                                                    monitor=MonitorConfig(check_interval=5)))
    experts = {n for n in runtime.names if ".local_experts." in n}
    assert len(experts) == 2 * 2 * EXPERTS, "every expert's fc1 and fc2, in both layers, is a layer"
    layer = f"decoder.layers.0.mlp.experts.local_experts.{expert}.linear_fc1"
    injector = FaultInjector(InjectConfig(kind="spike", layer=layer, start_step=7, factor=3e38), model)
    switches = _train(model, runtime, injector, 20)
    promoted = {e.layer for e in switches if e.to == "bf16"}
    assert promoted == {layer}, promoted
    # the spike saturates the expert's input: the GEMMs that read it (fprop, wgrad) move
    assert runtime.gemm_precisions()[layer] == {"fprop": "bf16", "dgrad": "fp8", "wgrad": "bf16"}
    assert all(p == "fp8" for n, p in runtime.precisions().items() if n != layer)


def test_experts_are_named_by_global_index_and_expert_parallel_is_refused():
    """At EP=2 rank 1 holds experts 2-3 as its ``local_experts.0..1``; their names carry the global index, as
    megatron's own sharded_state_dict numbers them. No EP step can run on gloo (the token dispatchers need
    CUDA), so the runtime refuses EP, naming the size."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(HERE / "moe_parallel_worker.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    held = dict(json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("EXPERTS"))
    half = EXPERTS // 2
    assert held == {0: [str(e) for e in range(half)], 1: [str(e) for e in range(half, EXPERTS)]}, held
    refused = [line for line in proc.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 2 and all("expert_model_parallel_size 2 is not supported" in r for r in refused)
