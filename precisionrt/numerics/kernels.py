"""Fused FP8 quantization for CUDA: amax, cast (+ transpose) and statistics in two passes over a tensor.

The eager code in ``fp8.py`` is the reference: it takes five or more kernels per tensor (abs, amax, multiply,
clamp, cast) and a copy per transposed layout. Here one Triton kernel reduces the amax (current scaling only:
under delayed scaling it returns at once once the history holds a value), and one kernel reads the tensor
again and writes, in a single pass,

* the FP8 bytes in row-major layout (the first GEMM operand of forward or dgrad),
* the same bytes transposed, zero-padded along the token dimension (the operands of wgrad and dgrad, as
  Transformer Engine's cast-transpose writes them),
* per-tile partial statistics, which a one-program kernel sums (in float64) and folds into the layer's
  statistics buffer (max for amax fields, sums for the rest): no ``combine_stats`` launches.

The scale is computed inside the cast kernel from the amax on the device, with the same operations, in the same
order, as ``fp8.compute_scale`` (``reciprocal(amax) * fmt_max * 2**-margin``, IEEE-rounded division), so the
FP8 bytes and the scale are bit-identical to the reference (``tests/test_cuda.py`` checks it on a GPU), and
statistics equal it up to float summation order. Nothing here synchronises with the host.

Triton is imported lazily: a CPU machine never needs it, and ``available(x)`` says whether the fused path
applies to a tensor.
"""

from __future__ import annotations

import functools

import torch

from precisionrt.numerics.fp8 import NUM_STATS, STAT_INDEX, FP8Format, ScalingState

__all__ = ["available", "quantize", "amax_stats"]

# Stat levels: what the cast kernel gathers per tile.
_NONE, _AMAX, _FULL = 0, 1, 2
# Columns of the per-program partials: amax, nonfinite, saturated, underflow, nonzero, err_sq, signal_sq,
# flushed_energy, weighted_signal.
_P_COLS = 10
# Scale modes of the cast kernel.
_SCALE_CURRENT, _SCALE_DELAYED, _SCALE_GIVEN = 0, 1, 2
_TILE_M, _TILE_N, _WARPS = 64, 64, 4   # cast kernel tile (rows, columns) and warps per program
_PROGRAMS_PER_SM = 4
_AMAX_BLOCK = 4096


@functools.cache
def _triton():
    """The Triton kernels, compiled on first use (lazy: Triton exists only where CUDA does)."""
    import triton
    import triton.language as tl

    @triton.jit
    def amax_kernel(x_ptr, n, ws_ptr, skip_ptr, HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr):
        # ws: int32[2] = [bits of max |x| over finite values, count of NaN/Inf]. Non-negative floats order
        # like their bit patterns, so an integer atomic max is the float max (and order-independent).
        if HAS_SKIP:
            if tl.load(skip_ptr) > 0:   # delayed scaling with a filled history: the amax is not needed
                return
        v_amax = tl.zeros([BLOCK], tl.float32)
        v_nonfinite = tl.zeros([BLOCK], tl.int32)
        for block in range(tl.program_id(0), tl.cdiv(n, BLOCK), tl.num_programs(0)):   # persistent
            offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            a = tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32))
            finite = a < float("inf")   # NaN compares false
            v_amax = tl.maximum(v_amax, tl.where(finite, a, 0.0))
            v_nonfinite += (~finite).to(tl.int32)
        amax = tl.max(v_amax, axis=0)
        nonfinite = tl.sum(v_nonfinite, axis=0)
        tl.atomic_max(ws_ptr, amax.to(tl.int32, bitcast=True))
        tl.atomic_add(ws_ptr + 1, nonfinite)

    @triton.jit
    def cast_kernel(x_ptr, M, N, stride_m, ws_ptr, prev_scale_ptr, filled_ptr, scale_out_ptr, scale_inv_out_ptr,
                    q_ptr, qt_ptr, M_PAD, part_ptr, cw_ptr, HAS_CW: tl.constexpr, P_COLS: tl.constexpr,
                    Q_DTYPE: tl.constexpr,
                    FMT_MAX: tl.constexpr, AMAX_MIN: tl.constexpr, SAT_BOUND: tl.constexpr, MARGIN_INV: tl.constexpr,
                    SCALE_MODE: tl.constexpr, WRITE_Q: tl.constexpr, WRITE_T: tl.constexpr, STATS: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr):
        prev = tl.load(prev_scale_ptr)
        if SCALE_MODE == 2:
            scale = prev
        else:
            # fp8.compute_scale: reciprocal(amax) * max / 2**margin where amax is finite and > 0, else prev;
            # clamped to the largest fp32 so a tiny amax cannot give an infinite scale.
            # No infinity is ever formed (the compiler may assume there are none): an amax below AMAX_MIN is
            # one whose reciprocal times FMT_MAX overflows, i.e. whose reference scale clamps to the fp32 max.
            amax = tl.load(ws_ptr).to(tl.float32, bitcast=True)
            usable = (tl.load(ws_ptr + 1) == 0) & (amax > 0)
            in_range = amax >= AMAX_MIN
            cur = tl.math.div_rn(1.0, tl.where(usable & in_range, amax, 1.0)) * FMT_MAX
            if MARGIN_INV != 1.0:
                cur = cur * MARGIN_INV
            cur = tl.where(in_range, cur, 3.4028234663852886e38)
            scale = tl.where(usable, cur, prev)
            if SCALE_MODE == 1:
                scale = tl.where(tl.load(filled_ptr) > 0, prev, scale)
        pid = tl.program_id(0)
        if pid == 0:
            tl.store(scale_out_ptr, scale)
            tl.store(scale_inv_out_ptr, tl.math.div_rn(1.0, scale))
        # Persistent: each program walks tiles pid, pid + programs, ... and keeps its statistics in per-row
        # registers, so the partials are one row per program, not per tile.
        v_amax = tl.zeros([BM], tl.float32)
        v_nonfinite = tl.zeros([BM], tl.float32)
        v_sat = tl.zeros([BM], tl.float32)
        v_under = tl.zeros([BM], tl.float32)
        v_nonzero = tl.zeros([BM], tl.float32)
        v_err = tl.zeros([BM], tl.float32)
        v_sig = tl.zeros([BM], tl.float32)
        v_flushed = tl.zeros([BM], tl.float32)
        v_wsig = tl.zeros([BM], tl.float32)
        tiles_n = tl.cdiv(N, BN)
        n_tiles = tl.cdiv(tl.maximum(M, M_PAD), BM) * tiles_n
        for tile in range(pid, n_tiles, tl.num_programs(0)):
            rm = (tile // tiles_n) * BM + tl.arange(0, BM)
            rn = (tile % tiles_n) * BN + tl.arange(0, BN)
            inside = (rm[:, None] < M) & (rn[None, :] < N)
            x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_m + rn[None, :], mask=inside, other=0.0)
            x = x.to(tl.float32)
            xs = x * scale
            clamped = tl.minimum(tl.maximum(xs, -FMT_MAX), FMT_MAX)
            clamped = tl.where(xs != xs, xs, clamped)   # NaN stays NaN, as torch.clamp keeps it
            q = clamped.to(Q_DTYPE)
            if WRITE_Q:
                tl.store(q_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], q, mask=inside)
            if WRITE_T:
                # The transposed tile is read again in transposed order (from cache) and cast again: the same
                # bytes. tl.trans of the tile above garbled some rows (Triton 3.6, float32 input). Rows
                # M..M_PAD are zeros: padding that leaves the wgrad reduction unchanged.
                xt = tl.load(x_ptr + rm[None, :].to(tl.int64) * stride_m + rn[:, None],
                             mask=(rn[:, None] < N) & (rm[None, :] < M), other=0.0).to(tl.float32)
                xts = xt * scale
                ct = tl.minimum(tl.maximum(xts, -FMT_MAX), FMT_MAX)
                ct = tl.where(xts != xts, xts, ct)
                tl.store(qt_ptr + rn[:, None].to(tl.int64) * M_PAD + rm[None, :], ct.to(Q_DTYPE),
                         mask=(rn[:, None] < N) & (rm[None, :] < M_PAD))
            if STATS > 0:
                a = tl.abs(x)
                finite = a < float("inf")
                v_amax = tl.maximum(v_amax, tl.max(tl.where(finite, a, 0.0), axis=1))
                v_nonfinite += tl.sum((~finite).to(tl.float32), axis=1)
                if STATS == 2:
                    xf = tl.where(finite, x, 0.0)
                    qf = q.to(tl.float32)
                    nonzero = finite & (x != 0.0)
                    err = tl.where(finite, xf - qf / scale, 0.0)
                    v_sat += tl.sum((finite & (tl.abs(xs) > SAT_BOUND)).to(tl.float32), axis=1)
                    v_under += tl.sum((nonzero & (qf == 0.0)).to(tl.float32), axis=1)
                    v_nonzero += tl.sum(nonzero.to(tl.float32), axis=1)
                    v_err += tl.sum(err * err, axis=1)
                    v_sig += tl.sum(xf * xf, axis=1)
                    energy = xf * xf
                    if HAS_CW:
                        energy = energy * tl.load(cw_ptr + rn, mask=rn < N, other=0.0)[None, :]
                    v_flushed += tl.sum(tl.where(nonzero & (qf == 0.0), energy, 0.0), axis=1)
                    v_wsig += tl.sum(energy, axis=1)
        if STATS > 0:
            row = part_ptr + pid * P_COLS
            tl.store(row + 0, tl.max(v_amax, axis=0))
            tl.store(row + 1, tl.sum(v_nonfinite, axis=0))
            if STATS == 2:
                tl.store(row + 2, tl.sum(v_sat, axis=0))
                tl.store(row + 3, tl.sum(v_under, axis=0))
                tl.store(row + 4, tl.sum(v_nonzero, axis=0))
                tl.store(row + 5, tl.sum(v_err, axis=0))
                tl.store(row + 6, tl.sum(v_sig, axis=0))
                tl.store(row + 7, tl.sum(v_flushed, axis=0))
                tl.store(row + 8, tl.sum(v_wsig, axis=0))

    @triton.jit
    def finalize_kernel(part_ptr, P, ws_ptr, scale_ptr, acc_ptr, amax_out_ptr, numel, P_COLS: tl.constexpr,
                        FROM_PARTS: tl.constexpr, LEVEL: tl.constexpr, HAS_SCALE: tl.constexpr,
                        BLOCK: tl.constexpr):
        # Totals of the partials (float64: counts stay exact beyond 2**24), then the statistics vector of
        # fp8.STAT_FIELDS folded into acc (max for amax and scaled_amax, sums for the rest), as combine_stats.
        if FROM_PARTS:
            v_amax = tl.zeros([BLOCK], tl.float32)
            v_nonfinite = tl.zeros([BLOCK], tl.float64)
            v_sat = tl.zeros([BLOCK], tl.float64)
            v_under = tl.zeros([BLOCK], tl.float64)
            v_nonzero = tl.zeros([BLOCK], tl.float64)
            v_err = tl.zeros([BLOCK], tl.float64)
            v_sig = tl.zeros([BLOCK], tl.float64)
            v_flushed = tl.zeros([BLOCK], tl.float64)
            v_wsig = tl.zeros([BLOCK], tl.float64)
            for start in range(0, P, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                m = offs < P
                base = part_ptr + offs * P_COLS
                v_amax = tl.maximum(v_amax, tl.load(base + 0, mask=m, other=0.0))
                v_nonfinite += tl.load(base + 1, mask=m, other=0.0).to(tl.float64)
                if LEVEL == 2:
                    v_sat += tl.load(base + 2, mask=m, other=0.0).to(tl.float64)
                    v_under += tl.load(base + 3, mask=m, other=0.0).to(tl.float64)
                    v_nonzero += tl.load(base + 4, mask=m, other=0.0).to(tl.float64)
                    v_err += tl.load(base + 5, mask=m, other=0.0).to(tl.float64)
                    v_sig += tl.load(base + 6, mask=m, other=0.0).to(tl.float64)
                    v_flushed += tl.load(base + 7, mask=m, other=0.0).to(tl.float64)
                    v_wsig += tl.load(base + 8, mask=m, other=0.0).to(tl.float64)
            amax = tl.max(v_amax, axis=0)
            nonfinite = tl.sum(v_nonfinite, axis=0)
            sat = tl.sum(v_sat, axis=0)
            under = tl.sum(v_under, axis=0)
            nonzero = tl.sum(v_nonzero, axis=0)
            err = tl.sum(v_err, axis=0)
            sig = tl.sum(v_sig, axis=0)
            flushed = tl.sum(v_flushed, axis=0)
            wsig = tl.sum(v_wsig, axis=0)
        else:
            amax = tl.load(ws_ptr).to(tl.float32, bitcast=True)
            nonfinite = tl.load(ws_ptr + 1).to(tl.float64)
        bad = nonfinite > 0
        # The amax the scaling history sees: nonfinite when the tensor held NaN/Inf (then it is not used).
        tl.store(amax_out_ptr, tl.where(bad, float("inf"), amax))
        if LEVEL > 0:
            scale = tl.load(scale_ptr) if HAS_SCALE else 0.0
            if LEVEL == 1:   # fp8.cheap_stats: amax of a tensor with NaN/Inf reads 0; nonfinite is an indicator
                amax = tl.where(bad, 0.0, amax)
                nonfinite = tl.where(bad, 1.0, 0.0).to(tl.float64)
            tl.store(acc_ptr + 0, tl.maximum(tl.load(acc_ptr + 0), amax))
            if HAS_SCALE:
                tl.store(acc_ptr + 1, tl.maximum(tl.load(acc_ptr + 1), amax * scale))
            tl.store(acc_ptr + 4, tl.load(acc_ptr + 4) + nonfinite.to(tl.float32))
            if LEVEL == 2:
                tl.store(acc_ptr + 5, tl.load(acc_ptr + 5) + numel)
                if HAS_SCALE:
                    tl.store(acc_ptr + 2, tl.load(acc_ptr + 2) + sat.to(tl.float32))
                    tl.store(acc_ptr + 3, tl.load(acc_ptr + 3) + under.to(tl.float32))
                    tl.store(acc_ptr + 6, tl.load(acc_ptr + 6) + nonzero.to(tl.float32))
                    tl.store(acc_ptr + 7, tl.load(acc_ptr + 7) + err.to(tl.float32))
                    tl.store(acc_ptr + 8, tl.load(acc_ptr + 8) + sig.to(tl.float32))
                    tl.store(acc_ptr + 9, tl.load(acc_ptr + 9) + flushed.to(tl.float32))
                    tl.store(acc_ptr + 10, tl.load(acc_ptr + 10) + wsig.to(tl.float32))

    return triton, amax_kernel, cast_kernel, finalize_kernel


def _check_layout() -> None:
    # The kernels write the statistics vector by position: fail loudly if fp8.STAT_FIELDS is reordered.
    expected = ("amax", "scaled_amax", "saturated", "underflow", "nonfinite", "numel", "nonzero", "err_sq",
                "signal_sq", "flushed_energy", "weighted_signal")
    if tuple(sorted(STAT_INDEX, key=STAT_INDEX.get)) != expected or NUM_STATS != len(expected):
        raise RuntimeError("precisionrt.numerics.kernels is out of date with fp8.STAT_FIELDS")


_check_layout()


def available(x: torch.Tensor) -> bool:
    """True when the fused path applies: a CUDA tensor and an importable Triton."""
    if not x.is_cuda:
        return False
    try:
        _triton()
    except ImportError:
        return False
    return True


def _tl_dtype(fmt: FP8Format):
    import triton.language as tl

    return {torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e5m2: tl.float8e5}[fmt.dtype]


@functools.cache
def _amax_min(fmt_max: float) -> float:
    """The smallest float32 amax whose scale ``float32(float32(1 / amax) * fmt_max)`` is finite (below it the
    reference clamps the scale to the fp32 maximum). Found by bisection over float32 bit patterns, with
    numpy's IEEE float32 arithmetic."""
    import numpy as np

    def finite(bits: int) -> bool:
        a = np.array([bits], dtype=np.uint32).view(np.float32)[0]
        with np.errstate(over="ignore", divide="ignore"):
            return bool(np.isfinite(np.float32(np.float32(1.0) / a) * np.float32(fmt_max)))

    lo, hi = 1, 0x7F7FFFFF
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if finite(mid) else (mid + 1, hi)
    return float(np.array([lo], dtype=np.uint32).view(np.float32)[0])


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs of the persistent cast kernel: a few per multiprocessor."""
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


_LEVELS = {"none": _NONE, "cheap": _AMAX, "full": _FULL}


def _launch_amax(x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    triton, amax_kernel, _, _ = _triton()
    ws = torch.zeros(2, dtype=torch.int32, device=x.device)
    n = x.numel()
    if n:
        grid = (max(1, min(triton.cdiv(n, _AMAX_BLOCK), _programs(x.device))),)
        amax_kernel[grid](x, n, ws, skip if skip is not None else ws, HAS_SKIP=skip is not None,
                          BLOCK=_AMAX_BLOCK, num_warps=8)
    return ws


def _finalize(parts, ws, scale, acc, numel: int, level: int, from_parts: bool) -> torch.Tensor:
    _, _, _, finalize_kernel = _triton()
    amax_out = torch.empty((), dtype=torch.float32, device=ws.device)
    dummy = ws if parts is None else parts
    finalize_kernel[(1,)](dummy, 0 if parts is None else parts.shape[0], ws,
                          scale if scale is not None else ws, acc if acc is not None else amax_out, amax_out,
                          float(numel), P_COLS=_P_COLS, FROM_PARTS=from_parts, LEVEL=level if acc is not None else 0,
                          HAS_SCALE=scale is not None, BLOCK=1024, num_warps=4)
    return amax_out


def quantize(x: torch.Tensor, fmt: FP8Format, state: ScalingState | None, *, update: bool, level: str,
             acc: torch.Tensor | None, write_q: bool = True, transpose_rows: int | None = None,
             scale: torch.Tensor | None = None, margin: int = 0, col_weight: torch.Tensor | None = None):
    """Quantize 2-D ``x`` ``[M, N]`` and return ``(q, q_t, scale, scale_inv)``.

    ``q`` is ``[M, N]`` row-major (None unless ``write_q``); ``q_t`` is ``[N, transpose_rows]`` row-major,
    the transposed bytes with columns ``M..transpose_rows`` zero (None when ``transpose_rows`` is None).
    The scale comes from ``state``'s recipe, or is ``scale`` as given (then ``state`` is not consulted), or,
    with neither, fresh current scaling with ``margin`` (the pre-flight dry run). Statistics at ``level``
    (``none`` | ``cheap`` | ``full``, the meanings of ``fp8.quantize_tensor``; ``col_weight`` as in
    ``fp8.tensor_stats``) are folded into ``acc``.
    With ``update`` the amax joins ``state``'s history.
    """
    triton, _, cast_kernel, _ = _triton()
    if x.dim() != 2:
        raise ValueError(f"kernels.quantize takes a 2-D tensor, got shape {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    M, N = x.shape
    dev = x.device
    if col_weight is not None:
        col_weight = col_weight.float().contiguous()
    lvl = _LEVELS[level] if acc is not None else _NONE
    if scale is not None:
        mode, ws, prev, filled = _SCALE_GIVEN, scale, scale, scale
    elif state is None:
        ws = _launch_amax(x if x.is_contiguous() else x.contiguous(), None)
        mode, prev, filled = _SCALE_CURRENT, torch.ones((), dtype=torch.float32, device=dev), ws
    elif state.config.recipe == "current":
        ws = _launch_amax(x if x.is_contiguous() else x.contiguous(), None)
        mode, prev, filled = _SCALE_CURRENT, state.scale, ws
    else:   # delayed: the amax pass runs only while the history is empty (decided on the device)
        ws = _launch_amax(x if x.is_contiguous() else x.contiguous(), state.history_filled)
        mode, prev, filled = _SCALE_DELAYED, state.scale, state.history_filled
    # Statistics the cast pass must gather: the amax of a delayed tensor (history update) or full statistics.
    need_amax_in_cast = mode == _SCALE_DELAYED and (update or lvl > _NONE)
    stats = _FULL if lvl == _FULL else (_AMAX if need_amax_in_cast else _NONE)
    q = torch.empty((M, N), dtype=fmt.dtype, device=dev) if write_q else None
    q_t = torch.empty((N, transpose_rows), dtype=fmt.dtype, device=dev) if transpose_rows is not None else None
    rows = max(M, transpose_rows or 0)
    tiles = triton.cdiv(rows, _TILE_M) * triton.cdiv(N, _TILE_N)
    grid = (max(1, min(tiles, _programs(dev))),)
    parts = torch.empty((grid[0], _P_COLS), dtype=torch.float32, device=dev) if stats else None
    scale_out = torch.empty((), dtype=torch.float32, device=dev)
    scale_inv = torch.empty((), dtype=torch.float32, device=dev)
    if rows and N:
        cast_kernel[grid](
            x, M, N, x.stride(0), ws, prev, filled, scale_out, scale_inv,
            q if q is not None else scale_out, q_t if q_t is not None else scale_out, transpose_rows or M,
            parts if parts is not None else scale_out, col_weight if col_weight is not None else scale_out,
            HAS_CW=col_weight is not None, P_COLS=_P_COLS, Q_DTYPE=_tl_dtype(fmt),
            FMT_MAX=fmt.max, AMAX_MIN=_amax_min(fmt.max), SAT_BOUND=fmt.saturation_bound, MARGIN_INV=2.0 ** -margin if state is None
            else 2.0 ** -state.config.margin, SCALE_MODE=mode, WRITE_Q=q is not None, WRITE_T=q_t is not None,
            STATS=stats, BM=_TILE_M, BN=_TILE_N, num_warps=_WARPS,
        )
    else:   # an empty tensor: the scale is what compute_scale gives for amax 0 (the previous one)
        scale_out.copy_(prev)
        scale_inv.copy_(prev.reciprocal())
    # The statistics kernel runs when statistics are asked for, or when a delayed history needs this amax.
    if lvl > _NONE or (update and mode == _SCALE_DELAYED):
        amax = _finalize(parts, ws, scale_out, acc, M * N, lvl, from_parts=stats > _NONE)
        if update and mode == _SCALE_DELAYED:
            state.update(amax)
    if update and mode == _SCALE_CURRENT and state is not None:
        state.scale.copy_(scale_out)   # what ScalingState.update computes under current scaling
    return q, q_t, scale_out, scale_inv


def amax_stats(x: torch.Tensor, acc: torch.Tensor) -> None:
    """Cheap statistics of a tensor a BF16 layer multiplies unquantized (``fp8.cheap_stats(abs_max(x),
    None)``) folded into ``acc``: one reduction pass and one tiny kernel."""
    ws = _launch_amax(x.contiguous(), None)
    _finalize(None, ws, None, acc, x.numel(), _AMAX, from_parts=False)
