"""FLOP accounting: the share of the managed layers' GEMM FLOPs that ran in FP8, over the run and per step.

Each layer counts its own GEMM FLOPs by precision from tensor shapes on the host (``layer.flops``), so the
accounting costs no device work. Attention score GEMMs, the embedding and the output head are not managed
layers and are in neither the numerator nor the denominator.
"""

from __future__ import annotations

from typing import Literal


class FlopAccounting:
    def __init__(self, layers: dict):
        self.layers = layers
        self._at_last_step = self.totals()
        self.step_fraction = self.fraction()

    def totals(self) -> tuple[int, int]:
        """GEMM FLOPs run so far in (FP8, BF16)."""
        return (sum(l.flops.fp8 for l in self.layers.values()), sum(l.flops.bf16 for l in self.layers.values()))

    def fraction(self, window: Literal["run", "step"] = "run") -> float:
        """FP8's share over the run or the last step. Before any forward: the share of FLOPs per token that
        the layers' current precisions assign to FP8."""
        if window == "step":
            return self.step_fraction
        fp8, bf16 = self.totals()
        if fp8 + bf16 == 0:
            per_token = {n: l.gemm_flops_per_token for n, l in self.layers.items()}
            return sum(f for n, f in per_token.items() if self.layers[n].precision == "fp8") / sum(per_token.values())
        return fp8 / (fp8 + bf16)

    def end_step(self) -> None:
        totals = self.totals()
        d_fp8, d_bf16 = (t - p for t, p in zip(totals, self._at_last_step))
        if d_fp8 + d_bf16:   # a step without a forward keeps the last step's share
            self.step_fraction = d_fp8 / (d_fp8 + d_bf16)
        self._at_last_step = totals

    def state_dict(self) -> dict:
        return {"flops": {n: [l.flops.fp8, l.flops.bf16] for n, l in self.layers.items()},
                "step_fraction": self.step_fraction}

    def load_state_dict(self, sd: dict) -> None:
        for name, layer in self.layers.items():
            layer.flops.fp8, layer.flops.bf16 = sd["flops"][name]
        self._at_last_step = self.totals()
        if "step_fraction" in sd:
            self.step_fraction = float(sd["step_fraction"])
