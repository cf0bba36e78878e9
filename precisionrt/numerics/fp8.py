"""FP8 numerics: formats, per-tensor scaling, saturating quantization and the FP8 GEMM.

Formats
-------
Two 8-bit floating-point formats (OCP FP8, as on Hopper and in ``torch``):

============  ==================  ========  ============  ==============
format        torch dtype         max       min normal    min subnormal
============  ==================  ========  ============  ==============
E4M3          float8_e4m3fn       448       2^-6          2^-9
E5M2          float8_e5m2         57344     2^-14         2^-16
============  ==================  ========  ============  ==============

The HYBRID recipe (Transformer Engine's default, ours too) uses E4M3 for what the forward pass multiplies
(activations and weights: more mantissa) and E5M2 for output gradients (more range).

Scaling
-------
A tensor ``x`` is stored as ``q = saturate(round_nearest_even(x * scale))`` with one fp32 ``scale`` per
tensor. ``scale = (fp8_max / amax) / 2**margin`` maps the tensor's absolute maximum just under the format's
maximum. The GEMM multiplies ``q`` operands and multiplies the fp32 accumulator by both *inverse* scales.

* **current** scaling takes ``amax`` from the tensor being quantized (one extra reduction, never overflows).
* **delayed** scaling takes ``amax`` from a history of earlier quantizations of the same tensor role
  (``max`` or ``most_recent`` of a ring buffer), so the scale is known before the tensor is read. A tensor
  that outgrows its history saturates: that is the failure the overflow monitor watches for. An empty history
  (the first use, or a layer just returned to FP8) falls back to current scaling instead of an arbitrary 1.0.
* If ``amax`` is 0 or not finite the previous scale is kept (as Transformer Engine does), so an all-zero
  tensor never produces an infinite scale.

All scale arithmetic is done with tensor ops on the tensor's device: no host synchronisation.

Saturation and statistics
-------------------------
``quantize`` clamps to +-max before the cast: the CUDA cast to ``float8_e4m3fn`` turns overflow into NaN
and the CPU cast maps +inf to 448, so neither may be relied on. NaN stays NaN, +-inf becomes +-max. Because
the cast hides infinities, statistics are taken from the unquantized tensor (see ``STAT_FIELDS``).

GEMM layouts
------------
``torch._scaled_mm(a, b)`` on CUDA (Hopper) requires: ``a`` row-major, ``b`` column-major, the reduced
dimension K and the output dimension N multiples of 16, fp32 scales, and never both operands E5M2. The CPU
kernel accepts more; ``scaled_mm`` below checks the CUDA rules on every device, so code tested here runs on
an H100. For ``y = x @ W^T`` (x: [M, K], W: [N, K]) the three GEMMs are::

    forward  y  = x_q  @ W_q^T      a = x_q [M,K] row-major       b = W_q^T [K,N] (a view: column-major)
    dgrad    dx = dy_q @ W_q        a = dy_q [M,N] row-major      b = W_q [N,K] made column-major
    wgrad    dW = dy_q^T @ x_q      a = dy_q^T [N,M] row-major    b = x_q [M,K] made column-major

M (tokens) is free in forward and dgrad but is the reduced dimension of wgrad: operands are zero-padded
along M to a multiple of 16, which leaves the product unchanged. A layer whose K or N is not a multiple of 16
cannot run FP8 on CUDA; ``fp8_gemm_unsupported_reason`` says why and the layer stays in BF16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from precisionrt.config import Checked, Range

__all__ = [
    "E4M3", "E5M2", "FORMATS", "FP8Format", "quantize", "tensor_stats", "STAT_FIELDS", "ScalingConfig",
    "ScalingState", "compute_scale", "quantize_tensor", "abs_max", "cheap_stats", "scaled_mm", "fp8_gemm_unsupported_reason", "GEMM_ALIGNMENT",
]


@dataclass(frozen=True)
class FP8Format:
    name: str
    dtype: torch.dtype
    max: float
    min_normal: float
    min_subnormal: float
    # max plus half the spacing below it: the smallest magnitude a cast without saturation would not round to
    # max. Only values beyond it lose anything to the clamp (amax * (max / amax) may land 1 ulp over max).
    saturation_bound: float


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, 448.0, 2.0**-6, 2.0**-9, 464.0)
E5M2 = FP8Format("e5m2", torch.float8_e5m2, 57344.0, 2.0**-14, 2.0**-16, 61440.0)
FORMATS = {f.name: f for f in (E4M3, E5M2)}

GEMM_ALIGNMENT = 16
SCALE_MAX = torch.finfo(torch.float32).max


def get_format(fmt: str | FP8Format) -> FP8Format:
    if isinstance(fmt, FP8Format):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown fp8 format {fmt!r}; expected one of {sorted(FORMATS)}") from None


def quantize(x: torch.Tensor, fmt: str | FP8Format, scale: torch.Tensor | float) -> torch.Tensor:
    """Contract C1: ``saturate(x * scale)`` rounded to nearest-even, as ``fmt``'s float8 dtype.

    The product is formed in fp32; NaN stays NaN and +-inf saturates to +-max.
    """
    f = get_format(fmt)
    scaled = x.float() * scale
    # clamp propagates NaN and maps +-inf to the bounds, which is exactly the saturation rule we want.
    return scaled.clamp_(-f.max, f.max).to(f.dtype)


# Per-tensor statistics of one quantization, as one fp32 vector (so many can be packed and reduced at once).
STAT_FIELDS = (
    "amax",          # max |x| over finite values
    "scaled_amax",   # max |x| * scale: above fmt.max means the scale was stale (delayed scaling saturates)
    "saturated",     # finite values with |x * scale| > fmt.saturation_bound (the clamp changed them)
    "underflow",     # nonzero finite values that quantized to 0
    "nonfinite",     # NaN or +-inf in x, seen before the cast (which would hide +inf): an exact count on
                     # full-statistics steps, an indicator (1 per tensor) on cheap ones
    "numel",
    "nonzero",       # finite nonzero values (the denominator of the underflow fraction)
    "err_sq",        # sum (x - dequant(q))^2 over finite values
    "signal_sq",     # sum x^2 over finite values
    "flushed_energy",   # sum w * x^2 over nonzero values that quantized to 0, w the GEMM partner's weight for
                        # x's column (see tensor_stats); with no partner, w = 1
    "weighted_signal",  # sum w * x^2 over finite values: the denominator of the flushed-energy share
)
STAT_INDEX = {name: i for i, name in enumerate(STAT_FIELDS)}
NUM_STATS = len(STAT_FIELDS)
# amax and scaled_amax (the first two fields) combine by max, the others by sum. Slices, not index lists: a
# list index is built on the host and copied to the device at every use.
_MAX_FIELDS = slice(0, 2)
_SUM_FIELDS = slice(2, NUM_STATS)
assert STAT_FIELDS[_MAX_FIELDS] == ("amax", "scaled_amax")


def abs_max(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-dim fp32 device tensor: one pass. NaN/Inf in ``x`` make it nonfinite, which both keeps
    the previous scale (``compute_scale``) and flags the tensor as nonfinite in the cheap statistics."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    # one reduction, computing in fp32 (max |x|, NaN propagating: exactly abs().amax().float())
    return torch.linalg.vector_norm(x.detach(), math.inf, dtype=torch.float32)


def cheap_stats(amax: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The statistics every step can afford, from the amax that scaling computes anyway: amax (finite part),
    scaled amax and a nonfinite indicator (exact counts come with ``tensor_stats`` on sampled steps)."""
    finite = amax < math.inf   # an amax is >= 0, +inf or NaN
    zero = torch.zeros((), dtype=torch.float32, device=amax.device)
    fields = dict.fromkeys(STAT_FIELDS, zero)
    fields["amax"] = torch.where(finite, amax, 0.0)
    if scale is not None:
        fields["scaled_amax"] = fields["amax"] * scale
    fields["nonfinite"] = (~finite).float()
    return torch.stack([fields[name] for name in STAT_FIELDS])


def tensor_stats(x: torch.Tensor, q: torch.Tensor | None, fmt: FP8Format, scale: torch.Tensor | None,
                 col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Exact statistics of quantizing ``x`` to ``q`` with ``scale``: a device tensor of ``NUM_STATS`` fp32
    values (several passes over ``x``: the runtime asks for them on sampled steps only).

    ``col_weight`` (one value per column of 2-D ``x``) weighs each element's energy by how much its column
    reaches the GEMM's output: for the input of ``y = x W^T`` the squared column norms of ``W``, for the
    weight those of ``x``, for the output gradient (dgrad ``dY W``) the squared row norms of ``W``. The
    flushed-energy share then measures the share of the product that flushing removes. It is what separates a
    harmless flush (many tiny gradient values, no energy) from a compensated outlier (channel 0 of ``x`` times
    1e6 and column 0 of ``W`` divided by it: every other channel flushes, and they carry most of ``y``, but
    almost none of ``x``'s own energy).

    With ``q=None`` (a layer running BF16) only amax, nonfinite and numel are filled.
    """
    xf = x.detach().float()
    finite = torch.isfinite(xf)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    xf_finite = torch.where(finite, xf, zero)
    absx = xf_finite.abs()
    # Built with torch.stack of device tensors: writing Python numbers into a CUDA tensor would copy each
    # one from the host (a synchronisation per field).
    fields = dict.fromkeys(STAT_FIELDS, zero)
    fields["amax"] = absx.amax() if x.numel() else zero
    fields["nonfinite"] = (~finite).sum().float()
    fields["numel"] = torch.full((), float(xf.numel()), dtype=torch.float32, device=x.device)
    if q is not None:
        fields["scaled_amax"] = fields["amax"] * scale
        fields["saturated"] = (absx * scale > fmt.saturation_bound).sum().float()
        qf = q.float()
        nonzero = xf_finite != 0
        fields["nonzero"] = nonzero.sum().float()
        fields["underflow"] = ((qf == 0) & nonzero).sum().float()
        err = torch.where(finite, xf_finite - qf / scale, zero)
        fields["err_sq"] = err.square().sum()
        fields["signal_sq"] = absx.square().sum()
        energy = absx.square() if col_weight is None else absx.square() * col_weight.float()
        fields["flushed_energy"] = torch.where((qf == 0) & nonzero, energy, zero).sum()
        fields["weighted_signal"] = energy.sum()
    return torch.stack([fields[name] for name in STAT_FIELDS])


def dry_run_stats(x: torch.Tensor, fmt: FP8Format, margin: int = 0,
                  col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor_stats`` of quantizing ``x`` with fresh current scaling, the result thrown away: what a tensor
    that a BF16 layer multiplies unquantized would look like in FP8 (the pre-flight check before a return)."""
    amax = abs_max(x)
    scale = compute_scale(amax, fmt, margin, torch.ones_like(amax))
    return tensor_stats(x, quantize(x, fmt, scale), fmt, scale, col_weight)


def combine_stats(acc: torch.Tensor, new: torch.Tensor) -> None:
    """Accumulate ``new`` into ``acc`` in place: max for the amax fields, sums for the rest. No host sync."""
    maxed = acc[..., _MAX_FIELDS]   # views: updated in place, without __setitem__'s write-back
    maxed.copy_(torch.maximum(maxed, new[..., _MAX_FIELDS]))
    acc[..., _SUM_FIELDS].add_(new[..., _SUM_FIELDS])


# --------------------------------------------------------------------------------------------- scaling


@dataclass
class ScalingConfig(Checked):
    """How per-tensor scales are chosen. ``recipe``: ``delayed`` or ``current``."""

    recipe: Literal["delayed", "current"] = "current"
    amax_history_len: Annotated[int, Range(ge=1, le=65536)] = 16
    """Transformer Engine's default is 1024; each entry is one fp32 per tensor role and layer."""
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    margin: Annotated[int, Range(ge=0, le=64)] = 0
    """Scale by 2^-margin below the largest: 448 * 2^-64 is still a normal fp32, far past any useful margin."""


def compute_scale(amax: torch.Tensor, fmt: FP8Format, margin: int, prev_scale: torch.Tensor) -> torch.Tensor:
    """``(fmt.max / amax) / 2**margin`` (at most the largest fp32); keeps ``prev_scale`` where amax is 0 or
    not finite. ``kernels.py`` repeats these operations in this order, bit for bit."""
    usable = (amax > 0) & (amax < math.inf)   # an amax is >= 0 or NaN: finite and positive, in 3 operations
    # Clamped to the largest fp32: a tiny nonzero amax (1e-36) would otherwise give an infinite scale. Where the
    # amax is not usable the quotient is inf or NaN, and the previous scale is taken instead.
    scale = fmt.max / amax
    if margin:
        scale = scale / (2.0**margin)
    return torch.where(usable, scale.clamp(max=SCALE_MAX), prev_scale)


class ScalingState:
    """Scale and amax history of one tensor role (input, weight or output gradient) of one layer.

    Lives on the layer's device; every update is a tensor op, in place: the tensors are allocated once, so
    compiled code can update them (``torch.compile`` refuses to rebind Python state inside an autograd function)
    and a captured CUDA graph keeps their addresses. ``history_filled`` counts pushes (saturating at the history
    length) so an empty history can fall back to current scaling without a branch on the host; ``cursor`` is the
    ring buffer's next slot, on the device too, so no host integer changes from step to step.
    """

    def __init__(self, fmt: FP8Format, config: ScalingConfig, device: torch.device | str = "cpu"):
        self.fmt = fmt
        self.config = config
        self.device = torch.device(device)
        self.defer = False   # set by the runtime for delayed scaling under tensor parallelism (see update)
        n = config.amax_history_len
        self.amax_history = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.scale = torch.ones((), dtype=torch.float32, device=self.device)
        self.history_filled = torch.zeros((), dtype=torch.int64, device=self.device)
        self.cursor = torch.zeros((), dtype=torch.int64, device=self.device)
        self.pending: torch.Tensor | None = None

    def reset(self) -> None:
        """Fresh state: no history, scale 1. Used when a layer returns to FP8."""
        self.amax_history.zero_()
        self.scale.fill_(1.0)
        self.history_filled.zero_()
        self.cursor.zero_()
        self.pending = None

    def _history_amax(self) -> torch.Tensor:
        if self.config.amax_compute_algo == "most_recent":
            return self.amax_history[(self.cursor - 1) % self.amax_history.numel()]
        return self.amax_history.max()

    def scale_for(self, amax: torch.Tensor) -> torch.Tensor:
        """The scale for a tensor whose (finite) amax is ``amax``, under this recipe: 0-dim fp32 tensor."""
        current = compute_scale(amax, self.fmt, self.config.margin, self.scale)
        if self.config.recipe == "current":
            return current
        return torch.where(self.history_filled > 0, self.scale, current)

    def commit(self, amax: torch.Tensor, scale: torch.Tensor) -> None:
        """``update`` after quantizing with ``scale = scale_for(amax)``: under current scaling that scale is the
        next one already (``update`` would compute it again), under delayed scaling the history moves on."""
        if self.config.recipe == "current":
            self.scale.copy_(scale)
        else:
            self.update(amax)

    def update(self, amax: torch.Tensor) -> None:
        """Record the amax of the tensor just quantized and derive the next delayed scale.

        With ``defer`` (delayed scaling under tensor parallelism) the amax is only kept (the max of the step's
        amaxes) until the runtime reduces every state's pending amax across the TP group in one collective and
        calls ``apply_pending``: then all TP ranks share one history and one scale per logical tensor."""
        if self.defer and self.config.recipe == "delayed":
            a = torch.nan_to_num(amax.detach().float().reshape(()), nan=float("inf"))   # NaN: unusable, as inf
            self.pending = a if self.pending is None else torch.maximum(self.pending, a)
            return
        self._apply(amax)

    def apply_pending(self, reduced_amax: torch.Tensor) -> None:
        """The deferred update with the amax reduced across ranks (see ``update``)."""
        self.pending = None
        self._apply(reduced_amax)

    def _apply(self, amax: torch.Tensor) -> None:
        if self.config.recipe == "current":
            self.scale.copy_(compute_scale(amax, self.fmt, self.config.margin, self.scale))
            return
        n = self.amax_history.numel()
        usable = torch.isfinite(amax) & (amax > 0)
        slot = self.cursor.reshape(1)
        kept = torch.where(usable, amax.reshape(()), self.amax_history.index_select(0, slot).reshape(()))
        self.amax_history.index_copy_(0, slot, kept.reshape(1).to(self.amax_history.dtype))
        self.history_filled.copy_(torch.where(usable, torch.clamp(self.history_filled + 1, max=n),
                                              self.history_filled))
        self.cursor.copy_((self.cursor + 1) % n)
        self.scale.copy_(compute_scale(self._history_amax(), self.fmt, self.config.margin, self.scale))

    def state_dict(self) -> dict:
        return {
            "amax_history": self.amax_history.clone(), "scale": self.scale.clone(),
            "history_filled": self.history_filled.clone(), "cursor": int(self.cursor),
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd["amax_history"].shape != self.amax_history.shape:
            raise ValueError(
                f"amax history length {tuple(sd['amax_history'].shape)} in checkpoint does not match "
                f"configured {tuple(self.amax_history.shape)}"
            )
        self.amax_history.copy_(sd["amax_history"])
        self.scale.copy_(sd["scale"])
        self.history_filled.copy_(sd["history_filled"])
        self.cursor.fill_(int(sd["cursor"]))


# ----------------------------------------------------------------------------------------------- GEMM


def fp8_gemm_unsupported_reason(in_features: int, out_features: int) -> str | None:
    """Why a [out, in] weight cannot run the three FP8 GEMMs under the CUDA rules, or None if it can.

    Forward reduces over in_features and outputs out_features; dgrad the reverse; wgrad reduces over
    tokens (padded) and outputs in_features. So both must be multiples of ``GEMM_ALIGNMENT``.
    """
    bad = [f"{n}={v}" for n, v in (("in_features", in_features), ("out_features", out_features))
           if v % GEMM_ALIGNMENT]
    if bad:
        return f"fp8 GEMM needs dims divisible by {GEMM_ALIGNMENT}: " + ", ".join(bad)
    return None


def _is_row_major(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) >= max(1, t.size(1))


def _is_col_major(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(0) == 1 and t.stride(1) >= max(1, t.size(0))


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same 2-D matrix stored column-major (a copy unless it already is)."""
    return t if _is_col_major(t) else t.t().contiguous().t()


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_inv_a: torch.Tensor, scale_inv_b: torch.Tensor,
              out_dtype: torch.dtype, use_fast_accum: bool = False) -> torch.Tensor:
    """``(a * scale_inv_a) @ (b * scale_inv_b)`` accumulated in fp32, checked against the CUDA rules.

    The single call site of ``torch._scaled_mm`` in precisionrt. ``use_fast_accum`` lets Hopper tensor
    cores accumulate in reduced precision (faster); the CPU kernel ignores it.
    """
    if a.dtype not in (E4M3.dtype, E5M2.dtype) or b.dtype not in (E4M3.dtype, E5M2.dtype):
        raise TypeError(f"scaled_mm takes float8 operands, got {a.dtype} and {b.dtype}")
    if a.dtype == E5M2.dtype and b.dtype == E5M2.dtype:
        raise TypeError("scaled_mm: both operands E5M2 is not supported by FP8 tensor cores")
    if not _is_row_major(a):
        raise ValueError(f"scaled_mm: first operand must be row-major, got strides {a.stride()}")
    if not _is_col_major(b):
        raise ValueError(f"scaled_mm: second operand must be column-major, got strides {b.stride()}")
    k, n = b.shape
    if a.size(1) != k:
        raise ValueError(f"scaled_mm: shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
    if k % GEMM_ALIGNMENT or n % GEMM_ALIGNMENT:
        raise ValueError(f"scaled_mm: K={k} and N={n} must be multiples of {GEMM_ALIGNMENT}")
    for s in (scale_inv_a, scale_inv_b):
        if s.dtype != torch.float32 or s.numel() != 1:
            raise TypeError("scaled_mm: scales must be single fp32 values (per-tensor scaling)")
    return torch._scaled_mm(a, b, scale_a=_scalar(scale_inv_a), scale_b=_scalar(scale_inv_b), out_dtype=out_dtype,
                            use_fast_accum=use_fast_accum)


def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 0 else t.reshape(())


def quantize_tensor(x: torch.Tensor, state: ScalingState, update: bool = True,
                    stats: Literal["none", "cheap", "full"] = "full", col_weight: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``x`` under ``state``'s recipe: returns ``(q, scale, stats)``, all on device (``stats`` is None
    for ``"none"``). With ``update`` the amax joins the history; evaluation passes ``update=False`` so it never
    moves training's scales."""
    amax = abs_max(x)
    scale = state.scale_for(amax)
    q = quantize(x, state.fmt, scale)
    out = None
    if stats == "full":
        out = tensor_stats(x, q, state.fmt, scale, col_weight)
    elif stats == "cheap":
        out = cheap_stats(amax, scale)
    if update:
        state.commit(amax, scale)
    return q, scale, out


def pad_rows(t: torch.Tensor, multiple: int = GEMM_ALIGNMENT) -> torch.Tensor:
    """Zero-pad dim 0 of a 2-D tensor to a multiple of ``multiple`` (zeros leave a reduction unchanged)."""
    extra = -t.size(0) % multiple
    if not extra:
        return t
    # float8 tensors do not support torch.cat/zeros on every backend: pad through uint8 views.
    pad = torch.zeros(extra, t.size(1), dtype=torch.uint8, device=t.device)
    return torch.cat([t.contiguous().view(torch.uint8), pad]).view(t.dtype)

