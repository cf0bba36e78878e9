"""FLOP accounting: the share of the managed layers' GEMM FLOPs that ran in FP8, over the run and per step.

Each layer counts its GEMM-tokens by precision (a token through one of its three GEMMs; each GEMM runs in its own
precision), from tensor shapes, into a device buffer (``layer.flop_tokens``: a host integer that changes at every
forward would make compiled code recompile at every call, and a captured CUDA graph would count once). FLOPs are
those GEMM-tokens times one GEMM's FLOPs per token, a third of the layer's ``gemm_flops_per_token``.
``end_step`` keeps the step's FLOPs on the device too; they reach the host only when a share is asked for (at
logging, at a checkpoint, at the end of a run): one transfer, never in ``end_step``. Attention score GEMMs, the
embedding and the output head are not managed layers and are in neither the numerator nor the denominator.

Under pipeline parallelism a rank counts only its stage's layers; the whole model's share then takes one
all-reduce over the pipeline group, made when a share is asked for. So under pipeline parallelism ``fraction``
is a collective: every rank of the pipeline group calls it. (Tensor-parallel shards and data-parallel replicas
count alike and need no reduction.)
"""

from __future__ import annotations

from typing import Literal

import torch


class FlopAccounting:
    def __init__(self, layers: dict, group=None, device: torch.device | None = None):
        """``layers``: this rank's managed layers; ``group``: the pipeline group whose other stages hold the rest
        of the model (None: this rank holds every layer, or a shard of it)."""
        self.layers, self.group, self.device = layers, group, device or torch.device("cpu")
        self._per_token = torch.tensor([[_per_gemm(l)] for l in layers.values()], dtype=torch.float64,
                                       device=self.device).reshape(-1, 1)
        self._at_last_step = self._tokens()
        self._step = torch.zeros(2, dtype=torch.float64, device=self.device)   # last step with a forward: (FP8, BF16)

    def _tokens(self) -> torch.Tensor:
        """``[layers, 2]`` training tokens so far by (FP8, BF16), on the device."""
        if not self.layers:
            return torch.zeros(0, 2, dtype=torch.int64, device=self.device)
        return torch.stack([l.flop_tokens for l in self.layers.values()])

    def _flops(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens.double() * self._per_token).sum(0)

    def totals(self) -> tuple[int, int]:
        """This rank's GEMM FLOPs run so far in (FP8, BF16), exactly (one transfer)."""
        per_token = [_per_gemm(l) for l in self.layers.values()]
        rows = self._tokens().tolist()
        return (sum(t[0] * p for t, p in zip(rows, per_token)), sum(t[1] * p for t, p in zip(rows, per_token)))

    def fractions(self) -> tuple[float, float]:
        """FP8's share over the run and over the last step, for the whole model (one transfer). Before any
        forward: the share of FLOPs per token that the layers' current precisions assign to FP8."""
        per_token = [float(sum(_per_gemm(l) * list(l.gemm_precisions.values()).count(p)
                               for l in self.layers.values())) for p in ("fp8", "bf16")]
        counts = torch.cat([self._flops(self._tokens()), self._step,
                            torch.tensor(per_token, dtype=torch.float64, device=self.device)])
        if self.group is not None:
            torch.distributed.all_reduce(counts, group=self.group)
        run_fp8, run_bf16, step_fp8, step_bf16, tok_fp8, tok_bf16 = counts.tolist()
        share = lambda a, b: a / (a + b) if a + b else None   # noqa: E731
        planned = share(tok_fp8, tok_bf16) or 0.0
        run = share(run_fp8, run_bf16)
        step = share(step_fp8, step_bf16)
        return (planned if run is None else run), (planned if step is None else step)

    def fraction(self, window: Literal["run", "step"] = "run") -> float:
        return self.fractions()[window == "step"]

    def end_step(self) -> None:
        """Close a step on the device: its FLOPs become the step's, unless it ran no forward (then the last
        step's share stays)."""
        tokens = self._tokens()
        delta = self._flops(tokens - self._at_last_step)
        self._step = torch.where(delta.sum() > 0, delta, self._step)
        self._at_last_step = tokens

    def state_dict(self) -> dict:
        per_token = [_per_gemm(l) for l in self.layers.values()]
        rows = self._tokens().tolist()
        return {"flops": {n: [t[0] * p, t[1] * p] for n, t, p in zip(self.layers, rows, per_token)},
                "step_flops": [int(v) for v in self._step.tolist()]}

    def load_state_dict(self, sd: dict) -> None:
        for name, layer in self.layers.items():
            fp8, bf16 = sd["flops"][name]
            per_token = _per_gemm(layer)   # checkpoints that counted layer-tokens: the same FLOPs, 3 GEMM-tokens each
            layer.flop_tokens.copy_(torch.tensor([fp8 // per_token, bf16 // per_token]))
        self._at_last_step = self._tokens()
        if "step_flops" in sd:
            step = [float(v) for v in sd["step_flops"]]
        elif "step_fraction" in sd:   # checkpoints before step_flops kept only the share
            share = float(sd["step_fraction"])
            step = [round(share * 10**6), 10**6 - round(share * 10**6)]
        else:
            return
        self._step = torch.tensor(step, dtype=torch.float64, device=self.device)


def _per_gemm(layer) -> int:
    """One GEMM's FLOPs per token: a third of the layer's (fprop, dgrad and wgrad cost alike)."""
    return layer.gemm_flops_per_token // 3
