"""PrecisionLinear inside a real megatron-core GPTModel on CPU: precision switches between steps."""

import copy

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from precisionrt.numerics.fp8 import STAT_INDEX, ScalingConfig
from precisionrt.layers.linear import LayerNumerics, PrecisionColumnParallelLinear, PrecisionRowParallelLinear, precision_layers
from precisionrt.layers.names import match_layers
from precisionrt.train import lm_loss

MANAGED = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def set_all(model, precision):
    for layer in precision_layers(model).values():
        layer.precision = precision


def test_spec_manages_the_four_linears_and_is_a_drop_in(small_model):
    layers = precision_layers(small_model)
    assert sorted({n.rsplit(".", 1)[1] for n in layers}) == sorted(MANAGED)
    assert len(layers) == 4 * 2
    for name, layer in layers.items():
        base = ColumnParallelLinear if name.endswith(("qkv", "fc1")) else RowParallelLinear
        assert isinstance(layer, base) and layer.precision in ("fp8", "bf16")
    # embedding and output head are Megatron's own modules, not managed
    assert not isinstance(small_model.output_layer, (PrecisionColumnParallelLinear, PrecisionRowParallelLinear))


def test_forward_backward_in_both_precisions(small_model, tokens):
    for precision in ("bf16", "fp8"):
        set_all(small_model, precision)
        small_model.zero_grad()
        loss = lm_loss(small_model, tokens)
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for p in small_model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert all(layer.precision == precision for layer in precision_layers(small_model).values())


def capture_outputs(model, tokens):
    outputs = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: outputs.__setitem__(n, out[0].detach().clone()))
             for n, m in precision_layers(model).items()]
    with torch.no_grad():
        lm_loss(model, tokens)
    for h in hooks:
        h.remove()
    return outputs


def test_switching_one_layer_changes_only_that_layers_numerics(small_model, tokens):
    set_all(small_model, "bf16")
    names = list(precision_layers(small_model))  # module order = execution order within this model
    before = capture_outputs(small_model, tokens)
    target = "decoder.layers.1.self_attention.linear_qkv"
    layers = precision_layers(small_model)
    for layer in layers.values():
        layer.numerics.drain_stats()
    layers[target].precision = "fp8"
    after = capture_outputs(small_model, tokens)
    upstream = [n for n in names if n.startswith("decoder.layers.0.")]
    for n in upstream:
        assert torch.equal(before[n], after[n]), f"{n} upstream of the switch changed"
    assert not torch.equal(before[target], after[target])
    for n, layer in layers.items():
        # BF16 layers record dry-run FP8 statistics (pre-flight) but never touch their scaling state
        scale = layer.numerics.scaling["input"].scale
        assert (scale != 1.0) == (n == target), f"{n}: only the switched layer quantizes"
        assert layer.numerics.stats[0, STAT_INDEX["err_sq"]] > 0, f"{n}: quantization error recorded"
        assert layer.precision == ("fp8" if n == target else "bf16")


def test_switch_touches_no_parameter_or_optimizer_state(small_model, tokens):
    opt = torch.optim.AdamW(small_model.parameters(), lr=1e-3)
    set_all(small_model, "fp8")
    lm_loss(small_model, tokens).backward()
    opt.step()
    params = {n: (p.data_ptr(), p.detach().clone(), p.dtype) for n, p in small_model.named_parameters()}
    opt_state = copy.deepcopy(opt.state_dict())
    set_all(small_model, "bf16")
    precision_layers(small_model)["decoder.layers.0.mlp.linear_fc1"].precision = "fp8"
    for n, p in small_model.named_parameters():
        ptr, value, dtype = params[n]
        assert p.data_ptr() == ptr and p.dtype == dtype == torch.float32 and torch.equal(p, value), n
    new_state = opt.state_dict()
    for k, v in opt_state["state"].items():
        for field, t in v.items():
            assert torch.equal(new_state["state"][k][field], t)


def test_loss_is_continuous_across_a_switch(small_model, tokens):
    set_all(small_model, "bf16")
    with torch.no_grad():
        bf16 = lm_loss(small_model, tokens).item()
        set_all(small_model, "fp8")
        fp8 = lm_loss(small_model, tokens).item()
    assert bf16 != fp8 and abs(fp8 - bf16) / bf16 < 0.01, (bf16, fp8)


def test_return_to_fp8_resets_scaling_state(small_model, tokens):
    layer = precision_layers(small_model)["decoder.layers.0.mlp.linear_fc2"]
    layer.numerics = LayerNumerics(ScalingConfig(recipe="delayed"), "cpu")
    layer.precision = "fp8"
    lm_loss(small_model, tokens).backward()
    state = layer.numerics.scaling["input"]
    assert state.history_filled > 0 and state.scale != 1.0
    layer.precision = "bf16"
    assert state.history_filled > 0, "leaving fp8 keeps the state (it is unused)"
    layer.precision = "fp8"
    assert layer.numerics.scaling["input"].history_filled == 0
    assert torch.all(layer.numerics.scaling["grad_output"].amax_history == 0)


def test_bad_precision_and_unknown_pattern_are_named(small_model):
    layer = precision_layers(small_model)["decoder.layers.0.mlp.linear_fc2"]
    with pytest.raises(ValueError, match="'fp16'"):
        layer.precision = "fp16"
    with pytest.raises(ValueError, match="decoder.layers.9"):
        match_layers(small_model, ["decoder.layers.9.*"])
    assert len(match_layers(small_model, ["*.mlp.*"])) == 4


def test_unaligned_layer_refuses_fp8_with_reason(parallel):
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=24, num_attention_heads=2, use_cpu_initialization=True,
                            gradient_accumulation_fusion=False)
    layer = PrecisionRowParallelLinear(24, 40, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                       input_is_parallel=True, skip_bias_add=False)
    assert not layer.fp8_capable and "in_features=24" in layer.fp8_unsupported_reason
    with pytest.raises(ValueError, match="divisible by 16"):
        layer.precision = "fp8"
    y, _ = layer(torch.randn(5, 2, 24))  # runs in bf16
    assert y.shape == (5, 2, 40)


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_non_contiguous_output_gradient_reaches_the_gemms_in_their_layout(precision):
    """A transposed output gradient (as a permute downstream can produce) must not reach scaled_mm as is."""
    from precisionrt.layers.linear import PrecisionLinearFunction

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, generator=g, requires_grad=True)
    w = torch.randn(48, 64, generator=g, requires_grad=True)
    y = PrecisionLinearFunction.apply(x, w, None, LayerNumerics(ScalingConfig(), "cpu"), precision, False, False,
                                      None)
    dy = torch.randn(48, 32, generator=g).t()      # [32, 48], column-major
    assert not dy.is_contiguous()
    y.backward(dy)
    ref = dy.double() @ w.detach().double()
    rel = ((x.grad.double() - ref).norm() / ref.norm()).item()
    assert rel < (0.08 if precision == "fp8" else 0.01)
