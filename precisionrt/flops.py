"""FLOP accounting: the share of the managed layers' GEMM FLOPs that ran in FP8, over the run and per step.

Each layer counts its own GEMM FLOPs by precision from tensor shapes on the host (``layer.flops``), so the
accounting costs no device work. Attention score GEMMs, the embedding and the output head are not managed
layers and are in neither the numerator nor the denominator.

Under pipeline parallelism a rank counts only its stage's layers; the whole model's share then takes one
all-reduce over the pipeline group, made when a share is asked for (at logging, at the end of a run), never in
``end_step``. So under pipeline parallelism ``fraction`` is a collective: every rank of the pipeline group calls
it. (Tensor-parallel shards and data-parallel replicas count alike and need no reduction.)
"""

from __future__ import annotations

from typing import Literal

import torch


class FlopAccounting:
    def __init__(self, layers: dict, group=None, device: torch.device | None = None):
        """``layers``: this rank's managed layers; ``group``: the pipeline group whose other stages hold the rest
        of the model (None: this rank holds every layer, or a shard of it)."""
        self.layers, self.group, self.device = layers, group, device or torch.device("cpu")
        self._at_last_step = self.totals()
        self._step = (0, 0)   # the last step that ran a forward: GEMM FLOPs in (FP8, BF16)

    def totals(self) -> tuple[int, int]:
        """This rank's GEMM FLOPs run so far in (FP8, BF16)."""
        return (sum(l.flops.fp8 for l in self.layers.values()), sum(l.flops.bf16 for l in self.layers.values()))

    def fractions(self) -> tuple[float, float]:
        """FP8's share over the run and over the last step, for the whole model. Before any forward: the share
        of FLOPs per token that the layers' current precisions assign to FP8."""
        per_token = [sum(l.gemm_flops_per_token for l in self.layers.values() if l.precision == p)
                     for p in ("fp8", "bf16")]
        counts = [*self.totals(), *self._step, *per_token]
        if self.group is not None:
            reduced = torch.tensor(counts, dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(reduced, group=self.group)
            counts = reduced.tolist()
        run_fp8, run_bf16, step_fp8, step_bf16, tok_fp8, tok_bf16 = counts
        share = lambda a, b: a / (a + b) if a + b else None   # noqa: E731
        planned = share(tok_fp8, tok_bf16) or 0.0
        run = share(run_fp8, run_bf16)
        step = share(step_fp8, step_bf16)
        return (planned if run is None else run), (planned if step is None else step)

    def fraction(self, window: Literal["run", "step"] = "run") -> float:
        return self.fractions()[window == "step"]

    def end_step(self) -> None:
        totals = self.totals()
        delta = tuple(t - p for t, p in zip(totals, self._at_last_step))
        if any(delta):   # a step without a forward keeps the last step's share
            self._step = delta
        self._at_last_step = totals

    def state_dict(self) -> dict:
        return {"flops": {n: [l.flops.fp8, l.flops.bf16] for n, l in self.layers.items()},
                "step_flops": list(self._step)}

    def load_state_dict(self, sd: dict) -> None:
        for name, layer in self.layers.items():
            layer.flops.fp8, layer.flops.bf16 = sd["flops"][name]
        self._at_last_step = self.totals()
        if "step_flops" in sd:
            self._step = tuple(int(v) for v in sd["step_flops"])
        elif "step_fraction" in sd:   # checkpoints before step_flops kept only the share
            share = float(sd["step_fraction"])
            self._step = (round(share * 10**6), 10**6 - round(share * 10**6))
