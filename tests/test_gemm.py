"""The FP8 and BF16 linear autograd function against float64 references.

Tolerances (relative Frobenius error ||y - y_ref|| / ||y_ref||), documented in docs/dynamic-precision.md ("Numerics"):
  E4M3 forward  <= 5%   (3 mantissa bits: per-element rounding <= 2^-4, errors average in the dot product)
  E5M2 dgrad/wgrad <= 8%   (2 mantissa bits on the output gradient, E4M3 on the other operand)
  BF16 all three <= 1%   (8 mantissa bits)
"""

import ml_dtypes
import numpy as np
import pytest
import torch

from precisionrt.numerics import fp8
from precisionrt.numerics.fp8 import ScalingConfig
from precisionrt.layers.linear import GRAD_INDEX, LayerNumerics, PrecisionLinearFunction

TOL = {("fp8", "y"): 0.05, ("fp8", "dx"): 0.08, ("fp8", "dw"): 0.08,
       ("bf16", "y"): 0.01, ("bf16", "dx"): 0.01, ("bf16", "dw"): 0.01}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(precision, x, w, g, recipe="current", shadow=False):
    numerics = LayerNumerics(ScalingConfig(recipe=recipe), "cpu")
    numerics.shadow = shadow
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    y = PrecisionLinearFunction.apply(x, w, None, numerics, precision, False, False, None)
    y.backward(g)
    return y.detach(), x.grad, w.grad, numerics


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
@pytest.mark.parametrize("m", [64, 37])  # 37 tokens: wgrad pads the reduced dimension to 48
def test_linear_against_float64(precision, m):
    torch.manual_seed(0)
    x, w, g = torch.randn(m, 96), torch.randn(80, 96) * 0.05, torch.randn(m, 80) * 1e-3
    y, dx, dw, _ = run(precision, x, w, g)
    errs = {"y": rel_err(y, x.double() @ w.double().t()), "dx": rel_err(dx, g.double() @ w.double()),
            "dw": rel_err(dw, g.double().t() @ x.double())}
    for k, e in errs.items():
        assert e <= TOL[(precision, k)], f"{precision} {k}: relative error {e:.4f}"
    if precision == "fp8":  # the path really quantizes: errors are far above fp32/bf16 rounding
        assert min(errs.values()) > 5e-3


def test_fp8_gemm_equals_product_of_independently_quantized_operands():
    """Forward output == fp64 product of ml_dtypes-quantized operands divided by the scales (fp32 accum)."""
    torch.manual_seed(1)
    x, w = torch.randn(32, 64) * 3, torch.randn(48, 64) * 0.1
    y, _, _, _ = run("fp8", x, w, torch.zeros(32, 48))
    sx, sw = 448 / x.abs().max().item(), 448 / w.abs().max().item()
    xq = (np.clip(x.numpy() * np.float32(sx), -448, 448)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    wq = (np.clip(w.numpy() * np.float32(sw), -448, 448)).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    ref = (xq @ wq.T) / (np.float32(sx) * np.float32(sw))
    np.testing.assert_allclose(y.double().numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_stats_accumulate_over_roles():
    torch.manual_seed(2)
    x, w, g = torch.randn(16, 32), torch.randn(16, 32), torch.randn(16, 16)
    x[0, 0] = float("nan")
    _, _, _, numerics = run("fp8", x, w, g)
    stats, _ = numerics.drain_stats()
    idx = fp8.STAT_INDEX
    assert stats[0, idx["nonfinite"]] == 1 and stats[1, idx["nonfinite"]] == 0
    assert stats[:, idx["numel"]].tolist() == [512, 512, 256]
    assert stats[1, idx["nonzero"]] == 512 and stats[1, idx["scaled_amax"]] == pytest.approx(448)
    assert torch.all(numerics.stats == 0), "drain resets the buffer"


def test_delayed_scaling_reports_saturation_of_a_grown_tensor():
    numerics = LayerNumerics(ScalingConfig(recipe="delayed", amax_history_len=4), "cpu")
    w = torch.randn(16, 32)
    for scale in (1.0, 1.0, 50.0):  # third step: inputs 50x larger than any history entry
        numerics.drain_stats()
        x = torch.randn(16, 32) * scale
        PrecisionLinearFunction.apply(x, w, None, numerics, "fp8", False, False, None)
    assert numerics.stats[0, fp8.STAT_INDEX["saturated"]] > 0


def test_shadow_gradients_measure_the_fp8_error_against_bf16():
    """Per FP8 backward GEMM: the error of dgrad's dX and of wgrad's dW against their BF16 recomputation."""
    torch.manual_seed(3)
    x, w, g = torch.randn(64, 96), torch.randn(80, 96) * 0.05, torch.randn(64, 80) * 1e-3
    _, dx, dw, numerics = run("fp8", x, w, g, shadow=True)
    grad = numerics.grad_stats
    assert grad[GRAD_INDEX["shadow_count"]] == 1
    assert grad[GRAD_INDEX["wgrad_sq"]].item() == pytest.approx(dw.square().sum().item(), rel=1e-5)
    ref = {"dgrad": (dx, g.bfloat16() @ w.bfloat16()), "wgrad": (dw, g.bfloat16().t() @ x.bfloat16())}
    for gemm, (ours, bf16) in ref.items():
        err_sq = (ours - bf16.float()).square().sum()
        assert grad[GRAD_INDEX[f"shadow_err_sq_{gemm}"]].item() == pytest.approx(err_sq.item(), rel=1e-4)
        rel = (grad[GRAD_INDEX[f"shadow_err_sq_{gemm}"]] / grad[GRAD_INDEX[f"shadow_ref_sq_{gemm}"]]).sqrt().item()
        assert 0.01 < rel < 0.1, f"an FP8 {gemm} gradient is a few percent from BF16"
    # a layer whose dgrad runs BF16 shadows its FP8 wgrad only
    _, _, _, mixed = run(("fp8", "bf16", "fp8"), x, w, g, shadow=True)
    assert mixed.grad_stats[GRAD_INDEX["shadow_ref_sq_dgrad"]] == 0 < mixed.grad_stats[GRAD_INDEX["shadow_ref_sq_wgrad"]]
    _, _, _, off = run("fp8", x, w, g, shadow=False)
    assert not any(off.grad_stats[i] for name, i in GRAD_INDEX.items() if name.startswith("shadow"))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_a_gemm_writing_bf16_equals_writing_fp32_and_casting(out_dtype):
    """The weight-gradient GEMM writes the weight's dtype itself (no cast pass after it): the accumulator is rounded
    once either way, so the bits must be those of an fp32 output cast afterwards, over magnitudes from 1e-3 to
    1e2 and both operand formats."""
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        a = torch.randn(64, 96, generator=g) * 10.0 ** (trial % 6 - 3)
        b = torch.randn(48, 96, generator=g)
        sa = fp8.compute_scale(fp8.abs_max(a), fp8.E5M2, 0, torch.ones(()))
        sb = fp8.compute_scale(fp8.abs_max(b), fp8.E4M3, 0, torch.ones(()))
        qa, qb = fp8.quantize(a, "e5m2", sa), fp8.quantize(b, "e4m3", sb)
        cast = fp8.scaled_mm(qa, qb.t(), sa.reciprocal(), sb.reciprocal(), torch.float32).to(out_dtype)
        direct = fp8.scaled_mm(qa, qb.t(), sa.reciprocal(), sb.reciprocal(), out_dtype)
        assert torch.equal(cast.view(torch.int16), direct.view(torch.int16)), trial
