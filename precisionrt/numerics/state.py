"""Per-layer numerics state, apart from any module: the scaling state of each tensor role and the device
buffers of accumulated statistics that the monitors read (``monitors.py`` imports this, not the layers, so
it needs no megatron). ``linear.py`` owns the layers that fill it."""

from __future__ import annotations

import torch

from precisionrt.numerics import fp8, kernels
from precisionrt.numerics.fp8 import E4M3, E5M2, NUM_STATS, ScalingConfig, ScalingState

ROLES = ("input", "weight", "grad_output")
OPERANDS = ROLES
"""The operands of a linear layer's GEMMs: ``x`` (E4M3), ``W`` (E4M3), ``dY`` (E5M2)."""
READ_BY = {"fprop": ("input", "weight"), "dgrad": ("grad_output", "weight"), "wgrad": ("grad_output", "input")}
"""The operands each GEMM reads (``y = x W^T``, ``dx = dY W``, ``dW = dY^T x``)."""
READERS = {role: tuple(g for g, ops in READ_BY.items() if role in ops) for role in ROLES}
"""The GEMMs that read each operand: trouble in ``x`` concerns fprop and wgrad, in ``W`` fprop and dgrad, in
``dY`` dgrad and wgrad."""
# Per-layer gradient statistics, accumulated in backward (sums over micro-batches); the shadow's per FP8
# backward GEMM (dgrad: dX, wgrad: dW), each compared with its BF16 recomputation:
GRAD_FIELDS = (
    "wgrad_sq",         # ||dW||^2 of the GEMM's weight gradient (any precision)
    "shadow_count",     # backward passes with a BF16 shadow recomputation
    *(f"{field}_{gemm}" for gemm in ("dgrad", "wgrad") for field in (
        "shadow_err_sq",    # ||g_fp8 - g_bf16||^2
        "shadow_ref_sq",    # ||g_bf16||^2
        "shadow_dot",       # <g_fp8, g_bf16>
        "shadow_fp8_sq",    # ||g_fp8||^2
    )),
)
GRAD_INDEX = {name: i for i, name in enumerate(GRAD_FIELDS)}


class LayerNumerics:
    """Per-layer FP8 state: one scaling state per tensor role and a device buffer of accumulated statistics.

    ``stats[role]`` holds ``fp8.STAT_FIELDS`` accumulated since the last ``drain_stats`` (amax: max; counts
    and sums: add). It never leaves the device by itself; the runtime packs all layers' buffers together.
    """

    def __init__(self, scaling: ScalingConfig, device: torch.device | str):
        self.scaling_config = scaling
        self.scaling = {
            "input": ScalingState(E4M3, scaling, device),
            "weight": ScalingState(E4M3, scaling, device),
            "grad_output": ScalingState(E5M2, scaling, device),
        }
        self.stats = torch.zeros(len(ROLES), NUM_STATS, dtype=torch.float32, device=device)
        self.grad_stats = torch.zeros(len(GRAD_FIELDS), dtype=torch.float32, device=device)
        # Set by the runtime on sampled steps: the next FP8 backward also computes BF16 reference gradients.
        self.shadow = False
        # False when nobody reads the statistics (static modes without monitors): saves their reductions.
        self.collect = True
        # Set by the runtime on sampled steps: exact statistics (several passes per tensor). Other steps
        # gather only what scaling computes anyway (amax, scaled amax, a nonfinite indicator).
        self.full_stats = True
        # Set from the module's train/eval mode at each forward: evaluation neither records statistics nor
        # advances amax histories, so it cannot change the training run (resume stays exact).
        self.training = True
        # On CUDA: quantize with the fused kernels (bit-identical to the eager reference, which stays the
        # path on CPU and when this is False).
        self.fused = True

    def use_fused(self, x: torch.Tensor) -> bool:
        """Fused CUDA kernels (``kernels.py``) unless turned off; the eager reference everywhere else, and under
        ``torch.compile``, which fuses the reference's operations itself (and cannot trace into a Triton launch
        that allocates its own buffers)."""
        return self.fused and kernels.available(x) and not torch.compiler.is_compiling()

    @property
    def recording(self) -> bool:
        return self.training and self.collect

    @property
    def stats_level(self) -> str:
        return "none" if not self.recording else ("full" if self.full_stats else "cheap")

    def partner_weights(self, x2d: torch.Tensor | None, weight: torch.Tensor, role: str) -> torch.Tensor | None:
        """How much each column of ``role``'s tensor reaches the GEMM output (``fp8.tensor_stats``'s
        ``col_weight``), on full-statistics steps only: squared column norms of the weight for the input,
        of the input for the weight, squared row norms of the weight for the output gradient."""
        if self.stats_level != "full":
            return None
        # vector_norm accumulates in fp32 inside one reduction pass: no fp32 copy of the operand
        norm = lambda t, dim: torch.linalg.vector_norm(t.detach(), dim=dim, dtype=torch.float32).square()  # noqa: E731
        if role == "input":
            return norm(weight, 0)
        if role == "weight":
            return norm(x2d, 0)
        return norm(weight, 1)

    def record_bf16(self, x: torch.Tensor, role: str, col_weight: torch.Tensor | None = None) -> None:
        """Statistics of a tensor that a BF16 layer multiplies unquantized. On full-statistics steps they come
        from a dry-run quantization with fresh scaling, so the policy can tell whether the layer would be
        healthy back in FP8 before it returns it (pre-flight)."""
        level = self.stats_level
        if level == "none":
            return
        fmt = self.scaling[role].fmt
        if self.use_fused(x):
            if level == "full":
                kernels.quantize(x, fmt, None, update=False, level="full", acc=self.acc(role), write_q=False,
                                 margin=self.scaling_config.margin, col_weight=col_weight)
            else:
                kernels.amax_stats(x, self.acc(role))
        elif level == "full":
            self.record(role, fp8.dry_run_stats(x, fmt, self.scaling_config.margin, col_weight))
        else:
            self.record(role, fp8.cheap_stats(fp8.abs_max(x), None))

    def acc(self, role: str) -> torch.Tensor | None:
        """The statistics row that the fused kernels fold a role's statistics into (None: not recording)."""
        return self.stats[ROLES.index(role)] if self.recording else None

    def record(self, role: str, stats: torch.Tensor | None) -> None:
        if stats is not None and self.recording:
            fp8.combine_stats(self.stats[ROLES.index(role)], stats)

    def record_grad(self, values: dict[str, torch.Tensor]) -> None:
        if self.recording:
            for name, v in values.items():
                self.grad_stats[GRAD_INDEX[name]] += v

    def drain_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Statistics accumulated since the last drain, ``(stats[roles, fields], grad_stats)``; resets both."""
        out = (self.stats.clone(), self.grad_stats.clone())
        self.stats.zero_()
        self.grad_stats.zero_()
        return out

    def load_grad_stats(self, saved: torch.Tensor) -> None:
        """Restore an open window's gradient statistics. A checkpoint from before the shadow was kept per GEMM
        holds one sum for dgrad and wgrad together: it is restored as dgrad's (the layer's own signal, their sum,
        is unchanged)."""
        if saved.numel() == len(GRAD_FIELDS):
            self.grad_stats.copy_(saved)
            return
        old = dict(zip(("wgrad_sq", "shadow_count", "shadow_err_sq", "shadow_ref_sq", "shadow_dot", "shadow_fp8_sq"),
                       saved.tolist()))
        self.grad_stats.zero_()
        for name, value in old.items():
            self.grad_stats[GRAD_INDEX[name if name in GRAD_INDEX else f"{name}_dgrad"]] = value

    def reset_scaling(self) -> None:
        for state in self.scaling.values():
            state.reset()

    def state_dict(self) -> dict:
        return {role: s.state_dict() for role, s in self.scaling.items()}

    def load_state_dict(self, sd: dict) -> None:
        for role, s in self.scaling.items():
            s.load_state_dict(sd[role])
