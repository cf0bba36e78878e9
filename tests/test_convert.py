"""Layers left out of FP8 are loud (issue 26, item 5): ``convert_layer_spec`` names every position its filter
leaves as megatron's linear in one warning, and ``strict=True`` turns that, and a layer whose dimensions FP8
GEMMs cannot take, into errors."""

import logging

import pytest
import torch


def _build(spec, hidden=64, ffn=128):
    from megatron.core.models.gpt import GPTModel

    from precisionrt.models.gpt import ModelConfig, transformer_config

    config = transformer_config(ModelConfig(num_layers=2, hidden_size=hidden, ffn_hidden_size=ffn))
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=256, max_sequence_length=32)


def _local():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization="RMSNorm")


def test_filtered_positions_are_named_in_a_warning_and_strict_refuses_them(parallel, caplog):
    from precisionrt import convert_layer_spec

    with caplog.at_level(logging.WARNING, logger="precisionrt.layers.convert"):
        convert_layer_spec(_local(), filter_fn=lambda path: path.startswith("mlp."), cpu_attention=True)
    (record,) = [r for r in caplog.records if r.name == "precisionrt.layers.convert"]
    assert "2 linear position(s)" in record.getMessage()
    assert "self_attention.linear_qkv" in record.getMessage() and "self_attention.linear_proj" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="precisionrt.layers.convert"):
        convert_layer_spec(_local(), cpu_attention=True)
    assert not caplog.records, "nothing to say when every position is converted"
    with pytest.raises(ValueError, match=r"strict=True.*2 linear position\(s\).*self_attention.linear_qkv"):
        convert_layer_spec(_local(), filter_fn=lambda path: path.startswith("mlp."), cpu_attention=True, strict=True)


def test_strict_refuses_a_layer_fp8_cannot_run_at_build_naming_it(parallel):
    from precisionrt import convert_layer_spec
    from precisionrt.layers.linear import precision_layers

    strict = convert_layer_spec(_local(), cpu_attention=True, strict=True)
    torch.manual_seed(0)
    assert all(layer.fp8_capable for layer in precision_layers(_build(strict)).values()), "aligned: builds"
    with pytest.raises(ValueError, match=r"\(fc1, weight 64 -> 200 on this rank\) cannot run FP8"):
        _build(strict, ffn=100)   # SwiGLU's fc1 is 64 -> 2 x 100: not a multiple of 16
    lenient = _build(convert_layer_spec(_local(), cpu_attention=True), ffn=100)
    stuck = [n for n, layer in precision_layers(lenient).items() if not layer.fp8_capable]
    assert stuck == ["decoder.layers.0.mlp.linear_fc1", "decoder.layers.0.mlp.linear_fc2",
                     "decoder.layers.1.mlp.linear_fc1", "decoder.layers.1.mlp.linear_fc2"]


def test_strict_keeps_the_params_a_spec_already_gives(parallel):
    from megatron.core.transformer.spec_utils import ModuleSpec

    from precisionrt import ScalingConfig, convert_layer_spec
    from precisionrt.layers.linear import PrecisionColumnParallelLinear, precision_layers

    spec = _local()
    scaling = ScalingConfig(recipe="delayed")
    sub = spec.submodules.mlp.submodules
    sub.linear_fc1 = ModuleSpec(module=sub.linear_fc1, params={"scaling": scaling})
    converted = convert_layer_spec(spec, cpu_attention=True, strict=True)
    fc1 = converted.submodules.mlp.submodules.linear_fc1
    assert fc1.module is PrecisionColumnParallelLinear and fc1.params == {"scaling": scaling, "strict": True}
    layer = precision_layers(_build(converted))["decoder.layers.0.mlp.linear_fc1"]
    assert layer.numerics.scaling_config is scaling


def test_grouped_gemm_experts_are_refused_naming_their_path_and_sequential_ones_converted():
    """Issue 26, item 4: megatron's GroupedMLP has no linear inside to swap, so converting would leave every
    expert unmanaged without a word; it is refused, naming the module path. SequentialMLP experts convert."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from precisionrt import convert_layer_spec
    from precisionrt.layers.linear import PrecisionColumnParallelLinear, PrecisionRowParallelLinear

    grouped = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=True, normalization="RMSNorm")
    with pytest.raises(ValueError, match=r"^mlp\.experts: GroupedMLP runs every expert "
                                         r"in one grouped GEMM.*moe_grouped_gemm=False"):
        convert_layer_spec(grouped)
    sequential = convert_layer_spec(get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False,
                                                             normalization="RMSNorm"))
    experts = sequential.submodules.mlp.submodules.experts
    assert experts.module.__name__ == "SequentialMLP"
    assert (experts.submodules.linear_fc1, experts.submodules.linear_fc2) == \
        (PrecisionColumnParallelLinear, PrecisionRowParallelLinear)
