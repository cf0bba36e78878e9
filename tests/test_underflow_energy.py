"""Underflow judged by harm: the share of the GEMM product's energy that flushing removes, not the count of
flushed values. Crafted tensors, checked through the statistics, the monitors' formula and the default policy."""

import torch

from precisionrt.numerics import fp8
from precisionrt.numerics.fp8 import E4M3, E5M2, STAT_INDEX
from precisionrt.runtime.policy import Policy, PolicyConfig


def shares(x: torch.Tensor, fmt, col_weight=None) -> tuple[float, float]:
    """(count share, energy share) of the nonzero values that flush under fresh current scaling."""
    s = fp8.dry_run_stats(x, fmt, col_weight=col_weight)
    count = float(s[STAT_INDEX["underflow"]] / s[STAT_INDEX["nonzero"]])
    energy = float(s[STAT_INDEX["flushed_energy"]] / s[STAT_INDEX["weighted_signal"]])
    return count, energy


def decide(**signals) -> list:
    base = {"overflow": 0.0, "underflow": 0.0, "underflow_energy_fwd": 0.0, "underflow_energy_grad": 0.0,
            "quant_error": 0.05, "nonfinite": 0.0}
    p = Policy(PolicyConfig(patience=1), ["l"], pinned={}, initial={"l": "fp8"})
    return [(d.to, d.reason) for d in p.decide({"l": {**base, **signals}}, {"l": 1})]


def test_many_flushed_values_without_energy_give_no_signal():
    # a gradient-like tensor: 85% ordinary values, 15% tiny ones that E5M2 flushes to zero
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(512, 256, generator=g)
    tiny = torch.rand(512, 256, generator=g) < 0.15
    dy[tiny] *= 1e-12
    w_rows = torch.rand(256, generator=g) + 0.5            # dgrad partner: squared row norms of W
    count, energy = shares(dy, E5M2, w_rows)
    assert 0.13 < count < 0.17, "about 15% of the values flush"
    assert energy < 1e-6, f"they carry no energy ({energy})"
    assert decide(underflow=count, underflow_energy_grad=energy) == [], "no promotion for a harmless flush"


def test_compensated_outlier_flushes_most_of_the_product():
    # the fault injection of contract C6: input channel 0 times 1e6, weight column 0 divided by it
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(256, 128, generator=g), torch.randn(64, 128, generator=g)
    x[:, 0] *= 1e6
    w[:, 0] /= 1e6
    count, energy = shares(x, E4M3, w.square().sum(0))
    assert count > 0.9
    assert energy > 0.9, f"the flushed channels carry most of y = x W^T ({energy})"
    _, unweighted = shares(x, E4M3)
    assert unweighted < 1e-6, "x's own energy is in the outlier channel: an unweighted share would miss it"
    assert decide(underflow=count, underflow_energy_fwd=energy) == [("bf16", "underflow")]


def test_energy_share_matches_the_product_it_stands_for():
    """The weighted share is what it claims: the energy flushing removes from y = x W^T, up to the
    cross terms, which average out for independent columns."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(2048, 64, generator=g), torch.randn(32, 64, generator=g)
    x[:, :32] *= 1e-3                     # half the channels weak, flushed next to one strong channel ...
    w[:, :32] *= 1e3                      # ... but as important to y as the others, through large weights
    x[:, 40] *= 1e3
    w[:, 40] /= 1e3
    scale = E4M3.max / x.abs().max()
    flushed = (fp8.quantize(x, E4M3, scale).float() == 0) & (x != 0)
    y = x.double() @ w.double().t()
    lost = float((torch.where(flushed, x, torch.zeros_like(x)).double() @ w.double().t()).square().sum()
                 / y.square().sum())
    _, energy = shares(x, E4M3, w.square().sum(0))
    assert 0.3 < lost < 0.7, "half of the product is lost"
    assert abs(energy - lost) < 0.05 * lost
