"""FP8 numerics: quantization bit-exact against ml_dtypes, exact statistics, scaling recipes, GEMM rules."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from precisionrt.numerics import fp8
from precisionrt.numerics.fp8 import E4M3, E5M2, STAT_INDEX, ScalingConfig, ScalingState

ML = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


def reference_quantize(x: np.ndarray, fmt: str, scale: float) -> np.ndarray:
    """Contract C1 with ml_dtypes: fp32 product, clip to +-max (NaN kept), round-to-nearest-even cast."""
    f = fp8.FORMATS[fmt]
    scaled = x.astype(np.float32) * np.float32(scale)
    return np.clip(scaled, -f.max, f.max).astype(ML[fmt])


def hard_values(fmt: str, rng: np.random.Generator, n: int = 20000) -> np.ndarray:
    f = fp8.FORMATS[fmt]
    parts = [
        rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6, n),                      # every magnitude
        rng.uniform(-2, 2, n) * f.min_subnormal * 8,                                  # subnormal range
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, f.max, -f.max, f.max * 1.01, 1e30, -1e30,
                  f.min_subnormal, f.min_subnormal / 2, f.min_subnormal * 0.51, f.min_normal]),
    ]
    # exact midpoints between neighbouring representable values exercise ties-to-even
    grid = np.arange(256, dtype=np.uint8).view(ML[fmt]).astype(np.float32)
    grid = np.sort(grid[np.isfinite(grid)])
    parts.append((grid[:-1] + grid[1:]) / 2)
    return np.concatenate(parts).astype(np.float32)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scale", [1.0, 0.37, 4096.0, 2.0**-10])
def test_quantize_matches_ml_dtypes_bit_for_bit(fmt, scale):
    x = hard_values(fmt, np.random.default_rng(0))
    ours = fp8.quantize(torch.from_numpy(x), fmt, torch.tensor(scale)).view(torch.uint8).numpy()
    ref = reference_quantize(x, fmt, scale)
    ref_bits = ref.view(np.uint8)
    nan = np.isnan(ref.astype(np.float32))
    assert np.array_equal(np.isnan(fp8.quantize(torch.from_numpy(x), fmt, scale).float().numpy()), nan)
    mismatch = np.flatnonzero(ours[~nan] != ref_bits[~nan])
    assert mismatch.size == 0, f"{mismatch.size} values differ, first input {x[~nan][mismatch[0]]!r}"


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_quantize_saturates_infinities_and_keeps_nan(fmt):
    q = fp8.quantize(torch.tensor([math.inf, -math.inf, math.nan, 1e9]), fmt, 1.0).float()
    assert q[0] == fmt.max and q[1] == -fmt.max and math.isnan(q[2]) and q[3] == fmt.max
    assert q.dtype == torch.float32 and fp8.quantize(torch.ones(1), fmt, 1.0).dtype == fmt.dtype


def test_stats_are_exact_on_crafted_tensor():
    # e4m3, scale 2: 300*2 and -600*2 saturate; 1e-4*2 flushes to zero; inf and nan are nonfinite.
    x = torch.tensor([0.0, 1e-4, 300.0, math.inf, math.nan, -600.0, 2.0, 0.5])
    scale = torch.tensor(2.0)
    q = fp8.quantize(x, E4M3, scale)
    s = fp8.tensor_stats(x, q, E4M3, scale)
    assert s[STAT_INDEX["amax"]] == 600.0
    assert s[STAT_INDEX["saturated"]] == 2
    assert s[STAT_INDEX["underflow"]] == 1
    assert s[STAT_INDEX["nonfinite"]] == 2
    assert s[STAT_INDEX["numel"]] == 8
    # error over finite values: saturated 300 -> 224, -600 -> -224, 1e-4 -> 0; 2.0 and 0.5 exact
    expected_err = (300 - 224) ** 2 + (600 - 224) ** 2 + 1e-4**2
    assert s[STAT_INDEX["err_sq"]].item() == pytest.approx(expected_err, rel=1e-6)
    assert s[STAT_INDEX["signal_sq"]].item() == pytest.approx(1e-8 + 300**2 + 600**2 + 4 + 0.25, rel=1e-6)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_saturation_bound_is_where_an_unclamped_cast_stops_rounding_to_max(fmt):
    f = fp8.FORMATS[fmt]
    below = np.array([np.nextafter(np.float32(f.saturation_bound), np.float32(0))], dtype=np.float32)
    above = np.array([np.nextafter(np.float32(f.saturation_bound), np.float32(np.inf))], dtype=np.float32)
    assert below.astype(ML[fmt]).astype(np.float32)[0] == f.max
    assert above.astype(ML[fmt]).astype(np.float32)[0] != f.max, "beyond the bound only the clamp gives max"
    x = torch.from_numpy(np.concatenate([below, above, [f.max]]))
    s = fp8.tensor_stats(x, fp8.quantize(x, f, 1.0), f, torch.tensor(1.0))
    assert s[STAT_INDEX["saturated"]] == 1, "only the value beyond the bound lost something to the clamp"


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_dry_run_stats_match_an_independent_quantization_with_fresh_scaling(fmt):
    # one outlier channel 1e6 x the rest: with its own amax as scale most other values flush to zero
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    x[:, 0] *= 1e6
    s = fp8.dry_run_stats(torch.from_numpy(x), fp8.FORMATS[fmt])
    scale = np.float32(fp8.FORMATS[fmt].max) / np.abs(x).max()
    q = reference_quantize(x, fmt, scale).astype(np.float32)
    assert s[STAT_INDEX["underflow"]] == int(((q == 0) & (x != 0)).sum())
    assert s[STAT_INDEX["saturated"]] == 0, "fresh current scaling never saturates"
    expected_err = float(((x.astype(np.float64) - q / scale) ** 2).sum())
    assert s[STAT_INDEX["err_sq"]].item() == pytest.approx(expected_err, rel=1e-4)


def test_empty_and_all_zero_tensors_are_well_defined():
    state = ScalingState(E4M3, ScalingConfig(recipe="current"))
    for x in (torch.empty(0, 16), torch.zeros(4, 16)):
        q, scale, stats = fp8.quantize_tensor(x, state)
        assert q.shape == x.shape and q.dtype == E4M3.dtype
        assert torch.isfinite(scale) and scale == 1.0, "amax 0 must keep the previous scale"
        assert stats[STAT_INDEX["amax"]] == 0 and stats[STAT_INDEX["nonfinite"]] == 0
        assert torch.all(q.float() == 0)


def test_delayed_scaling_history_and_fallback():
    cfg = ScalingConfig(recipe="delayed", amax_history_len=3, amax_compute_algo="max", margin=1)
    state = ScalingState(E4M3, cfg)
    # empty history: current scaling of the tensor itself
    assert state.scale_for(torch.tensor(7.0)) == pytest.approx(448 / 7 / 2)
    for amax in (4.0, 16.0, 2.0):
        state.update(torch.tensor(amax))
    assert state.scale_for(torch.tensor(1000.0)) == pytest.approx(448 / 16 / 2), "delayed ignores current"
    state.update(torch.tensor(1.0))   # ring of 3: 16 still there (slots: 1, 16, 2)
    assert state.scale == pytest.approx(448 / 16 / 2)
    state.update(torch.tensor(1.0))   # 16 evicted
    assert state.scale == pytest.approx(448 / 2 / 2)
    state.update(torch.tensor(math.nan))  # nonfinite amax: history and scale unchanged
    assert state.scale == pytest.approx(448 / 2 / 2)
    state.reset()
    assert state.history_filled == 0 and state.scale == 1.0

    recent = ScalingState(E5M2, ScalingConfig(amax_history_len=4, amax_compute_algo="most_recent"))
    for amax in (8.0, 1.0):
        recent.update(torch.tensor(amax))
    assert recent.scale == pytest.approx(57344 / 1.0)


@pytest.mark.parametrize("bad", [{"recipe": "later"}, {"amax_history_len": 0}, {"margin": -1},
                                 {"amax_compute_algo": "mean"}])
def test_scaling_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ScalingConfig(**bad)


def _q(t, fmt):
    return fp8.quantize(t, fmt, 1.0)


def test_scaled_mm_enforces_cuda_layout_rules():
    a, b = _q(torch.randn(8, 32), E4M3), _q(torch.randn(32, 16), E4M3)
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match="column-major"):
        fp8.scaled_mm(a, b, one, one, torch.float32)           # b row-major
    with pytest.raises(ValueError, match="row-major"):
        fp8.scaled_mm(fp8.column_major(a), fp8.column_major(b), one, one, torch.float32)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8.scaled_mm(_q(torch.randn(8, 24), E4M3), fp8.column_major(_q(torch.randn(24, 16), E4M3)),
                      one, one, torch.float32)
    with pytest.raises(TypeError, match="E5M2"):
        fp8.scaled_mm(_q(torch.randn(8, 32), E5M2), fp8.column_major(_q(torch.randn(32, 16), E5M2)),
                      one, one, torch.float32)
    # the legal layout: product of the dequantized operands, scaled by both inverse scales
    y = fp8.scaled_mm(a, fp8.column_major(b), torch.tensor(0.5), torch.tensor(0.25), torch.float32)
    ref = (a.double() @ b.double()) * 0.125
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)


def test_pad_rows_keeps_values_and_pads_zeros():
    t = _q(torch.randn(10, 16), E4M3)
    p = fp8.pad_rows(t)
    assert p.shape == (16, 16) and p.dtype == t.dtype
    assert torch.equal(p[:10].view(torch.uint8), t.view(torch.uint8)) and torch.all(p[10:].float() == 0)


def test_gemm_alignment_reason():
    assert fp8.fp8_gemm_unsupported_reason(64, 128) is None
    assert "in_features=60" in fp8.fp8_gemm_unsupported_reason(60, 128)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_tiny_amax_gives_the_largest_finite_scale_not_inf(fmt):
    """amax 1e-36: (max / amax) overflows fp32. The scale is clamped to the fp32 maximum, so the tensor
    quantizes to finite values and reads as healthy, not as a nonfinite fault."""
    x = torch.full((16, 16), 1e-36)
    q, scale, stats = fp8.quantize_tensor(x, ScalingState(fmt, ScalingConfig()), stats="full")
    assert torch.isfinite(scale) and scale.item() == torch.finfo(torch.float32).max
    assert torch.isfinite(q.float()).all() and (q.float() > 0).all()
    assert stats[STAT_INDEX["nonfinite"]] == 0
