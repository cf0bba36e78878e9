"""The README's "embed in your own loop" example runs as written, and converting megatron's own local GPT
spec gives a model whose injected outlier the runtime promotes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent


def run_readme_example(heading: str, cwd: Path) -> str:
    """Run the first python block after ``heading`` in the README, in ``cwd``; its stdout."""
    section = (ROOT / "README.md").read_text().split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (cwd / "example.py").write_text(code)
    proc = subprocess.run([sys.executable, "example.py"], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_readme_embedding_example_runs_as_written(tmp_path):
    assert "of GEMM FLOPs in FP8" in run_readme_example("## Embed in your own Megatron loop", tmp_path)
    assert (tmp_path / "runs/embedded/precision_events.jsonl").is_file()


def test_readme_compiled_example_runs_as_written(tmp_path):
    out = run_readme_example("### Compiled", tmp_path)
    assert "compiled: " in out and "of GEMM FLOPs in FP8" in out
    assert (tmp_path / "runs/compiled/precision_events.jsonl").is_file()


def test_megatron_local_spec_converted_promotes_an_injected_outlier(parallel, tmp_path):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from precisionrt import MonitorConfig, PrecisionRuntime, RuntimeConfig, convert_layer_spec
    from precisionrt.run.inject import FaultInjector, InjectConfig
    from precisionrt.layers.linear import precision_layers
    from precisionrt.models.gpt import ModelConfig, transformer_config
    from precisionrt.train import lm_loss

    base = get_gpt_layer_local_spec(normalization="RMSNorm")
    only_mlp = convert_layer_spec(base, filter_fn=lambda path: path.startswith("mlp."), cpu_attention=True)
    assert only_mlp.submodules.self_attention.submodules.linear_qkv is ColumnParallelLinear
    assert base.submodules.mlp.submodules.linear_fc1 is ColumnParallelLinear, "the input spec is not modified"

    torch.manual_seed(0)
    config = transformer_config(ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128))
    model = GPTModel(config=config, transformer_layer_spec=convert_layer_spec(base, cpu_attention=True),
                     vocab_size=256, max_sequence_length=32)
    layers = precision_layers(model)
    assert len(layers) == 8, "qkv, proj, fc1, fc2 of both layers"
    target = "decoder.layers.1.mlp.linear_fc2"
    rt = PrecisionRuntime(model, RuntimeConfig(mode="dynamic", monitor=MonitorConfig(
        check_interval=2, full_stats_every=1)), run_dir=tmp_path)
    inject = FaultInjector(InjectConfig(kind="outlier", layer=target, start_step=3, factor=1e6), model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    events = []
    for step in range(1, 9):
        inject.before_step(step - 1)
        lm_loss(model, torch.randint(0, 256, (4, 33), generator=g)).backward()
        opt.step()
        opt.zero_grad()
        events += rt.end_step(step)
    rt.close(8)
    assert [(e.step, e.layer, e.to, e.reason) for e in events] == [(4, target, "bf16", "underflow")]


def test_transformer_engine_modules_are_refused_by_path():
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from precisionrt import convert_layer_spec

    class TELayerNormColumnParallelLinear:   # stands for TE's fused norm + linear, absent on this machine
        pass

    spec = ModuleSpec(module=SelfAttention, submodules=SelfAttentionSubmodules(
        linear_qkv=TELayerNormColumnParallelLinear, core_attention=None))
    with pytest.raises(ValueError, match="linear_qkv: TELayerNormColumnParallelLinear is a Transformer Engine"):
        convert_layer_spec(spec)


def test_readme_bring_your_model_example_runs_as_written(tmp_path):
    pytest.importorskip("transformers")
    assert "of GEMM FLOPs ran in FP8" in run_readme_example("## Bring your model", tmp_path)
    trained = tmp_path / "tiny-qwen3-trained"
    assert (trained / "config.json").is_file() and (trained / "model.safetensors").is_file()
    from safetensors.torch import load_file

    before, after = load_file(tmp_path / "tiny-qwen3" / "model.safetensors"), load_file(trained / "model.safetensors")
    assert before.keys() == after.keys()
    assert not torch.equal(before["model.layers.0.mlp.down_proj.weight"], after["model.layers.0.mlp.down_proj.weight"]), \
        "the export holds the trained weights"
