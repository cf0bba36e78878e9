"""PrecisionLinear: Megatron-core column/row-parallel linear layers whose GEMMs run in FP8 or BF16.

The layers are drop-in subclasses of ``ColumnParallelLinear`` and ``RowParallelLinear``: same constructor,
same forward contract, same parameters. They replace only ``_forward_impl``, the seam where Megatron calls
its GEMM autograd function, with ``PrecisionLinearFunction``, which keeps that function's tensor-parallel
duties (all-gather of the input under sequence parallelism; all-reduce of the input gradient when
``allreduce_dgrad``; its reduce-scatter under sequence parallelism).

Each of a layer's three GEMMs has its own precision (``layer.gemm_precisions``: ``fprop`` ``y = x W^T``, ``dgrad``
``dx = dY W``, ``wgrad`` ``dW = dY^T x``), and any may change between two steps; ``layer.precision`` reads
``"fp8"``/``"bf16"`` when all three agree (``"mixed"`` otherwise) and sets all three. An operand is quantized
only when a GEMM that reads it runs FP8 (``x``: fprop, wgrad; ``W``: fprop, dgrad; ``dY``: dgrad, wgrad), and an
operand that comes back into FP8 starts from fresh scaling state, never a stale amax history. Parameters stay
where they are, in the model's dtype (the fp32 master copy on CPU); only the GEMM operands are cast.
"""

from __future__ import annotations

import torch

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    dist_all_gather_func,
    dist_reduce_scatter_func,
)

from precisionrt.numerics import fp8, kernels
from precisionrt.numerics.fp8 import E4M3, E5M2, ScalingConfig
from precisionrt.numerics.state import GRAD_FIELDS, GRAD_INDEX, ROLES, LayerNumerics  # noqa: F401  (re-exported)
from precisionrt.numerics.state import OPERANDS, READERS
from precisionrt.observe.events import GEMMS, MIXED, PRECISIONS, layer_precision

_GEMM_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOP_SLOT = {"fp8": 0, "bf16": 1}   # the columns of a layer's ``flop_tokens`` (GEMM-tokens: a GEMM times a token)


def _gemm_out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The GEMM writes ``dtype`` itself when it can (its fp32 accumulator rounded once, in its epilogue: the same
    bits as writing fp32 and casting, tested on the CPU), so no cast pass follows it."""
    return dtype if dtype in _GEMM_OUT_DTYPES else torch.float32


class PrecisionLinearFunction(torch.autograd.Function):
    """``y = x @ W^T (+ b)`` with FP8 or BF16 GEMMs and Megatron's tensor-parallel communication.

    In FP8 the quantized operands (not the high-precision ones) are saved for backward, as Transformer
    Engine does: the input is stored in 8 bits.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, numerics: LayerNumerics, precisions: tuple[str, str, str] | str,
                allreduce_dgrad: bool, sequence_parallel: bool, tp_group, grad_scale: torch.Tensor | None = None):
        """``precisions``: of fprop, dgrad and wgrad (one string: all three). ``grad_scale``: an injected
        ``grad_outlier`` (``PrecisionLinearMixin.grad_channel_scale``)."""
        if isinstance(precisions, str):
            precisions = (precisions,) * 3
        fprop8, dgrad8, wgrad8 = (p == "fp8" for p in precisions)
        ctx.dgrad8, ctx.wgrad8, ctx.grad_scale = dgrad8, wgrad8, grad_scale
        ctx.numerics = numerics
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.sequence_parallel = sequence_parallel
        ctx.tp_group = tp_group
        ctx.use_bias = bias is not None
        ctx.input_shape = input.shape
        ctx.input_dtype = input.dtype
        ctx.weight_dtype = weight.dtype
        ctx.fused = False

        if sequence_parallel:
            gathered = list(input.shape)
            gathered[0] *= tp_group.size()
            total_input = torch.empty(gathered, dtype=input.dtype, device=input.device)
            dist_all_gather_func(total_input, input.contiguous(), group=tp_group)
        else:
            total_input = input
        ctx.total_input_shape = total_input.shape
        x2d = total_input.reshape(-1, total_input.shape[-1])
        out_dtype = _gemm_out_dtype(input.dtype)

        if fprop8 and dgrad8 and wgrad8 and grad_scale is None and numerics.use_fused(x2d):
            return _fused_forward(ctx, x2d, weight, bias, numerics, out_dtype, input.dtype, total_input.shape)
        # An operand is quantized only if a GEMM that reads it runs FP8 (the input: fprop and wgrad; the weight:
        # fprop and dgrad); otherwise its statistics are those of a BF16 layer (a dry run on full steps).
        level = numerics.stats_level
        xq = sx_inv = wq = sw_inv = None
        if fprop8 or wgrad8:
            xq, sx, st_x = fp8.quantize_tensor(x2d, numerics.scaling["input"], numerics.training, level,
                                               numerics.partner_weights(x2d, weight, "input"))
            numerics.record("input", st_x)
            sx_inv = sx.reciprocal()   # once: wgrad takes it too
        else:
            numerics.record_bf16(x2d, "input", numerics.partner_weights(x2d, weight, "input"))
        if fprop8 or dgrad8:
            wq, sw, st_w = fp8.quantize_tensor(weight, numerics.scaling["weight"], numerics.training, level,
                                               numerics.partner_weights(x2d, weight, "weight"))
            numerics.record("weight", st_w)
            sw_inv = sw.reciprocal()
        elif level == "full":  # the weight's amax alone tells nothing: only the dry run
            numerics.record_bf16(weight, "weight", numerics.partner_weights(x2d, weight, "weight"))
        if fprop8:
            # Fast (reduced-precision) accumulation only in forward, as Transformer Engine does on Hopper.
            y = fp8.scaled_mm(xq, wq.t(), sx_inv, sw_inv, out_dtype, use_fast_accum=True)
        else:
            y = (x2d.to(torch.bfloat16) @ weight.to(torch.bfloat16).t()).to(out_dtype)
        # A shadow step keeps the high-precision input too, for the BF16 reference gradients of FP8 backward GEMMs.
        ctx.shadow = numerics.shadow and numerics.training and (dgrad8 or wgrad8)
        # wgrad reads the quantized input if it runs FP8 (stored in 8 bits, as Transformer Engine does), else the
        # input itself; the weight parameter itself costs no memory (BF16 dgrad, and the statistics' weights)
        keep_x = x2d if not wgrad8 or ctx.shadow else None
        ctx.save_for_backward(xq if wgrad8 else None, sx_inv if wgrad8 else None, wq if dgrad8 else None,
                              sw_inv if dgrad8 else None, weight, keep_x)

        y = y.to(input.dtype).reshape(*total_input.shape[:-1], weight.shape[0])
        if bias is not None:
            y = y + bias
        return y

    @staticmethod
    def backward(ctx, grad_output):
        # contiguous: a transposed output gradient would reach the GEMM in a layout it refuses
        g2d = grad_output.reshape(-1, grad_output.shape[-1]).contiguous()
        needs_input_grad, needs_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        numerics: LayerNumerics = ctx.numerics
        dgrad8, wgrad8 = ctx.dgrad8, ctx.wgrad8

        if ctx.fused:
            return _fused_backward(ctx, g2d)
        xq, sx_inv, wq, sw_inv, weight, x2d = ctx.saved_tensors
        grad_for_bias = g2d
        if ctx.grad_scale is not None:   # injected grad_outlier: see PrecisionLinearMixin.grad_channel_scale
            g2d, weight = g2d * ctx.grad_scale, weight / ctx.grad_scale[:, None]
            wq = None if wq is None else fp8.quantize(weight, "e4m3", sw_inv.reciprocal())   # dgrad's, same scale
        if dgrad8 or wgrad8:   # the output gradient is quantized once, for the FP8 GEMMs that read it
            gq, sg, st_g = fp8.quantize_tensor(g2d, numerics.scaling["grad_output"], numerics.training,
                                               numerics.stats_level,
                                               numerics.partner_weights(None, weight, "grad_output"))
            numerics.record("grad_output", st_g)
            sg_inv = sg.reciprocal()
        else:
            numerics.record_bf16(g2d, "grad_output", numerics.partner_weights(None, weight, "grad_output"))
        g_bf16 = g2d.to(torch.bfloat16) if not (dgrad8 and wgrad8) else None
        if dgrad8:
            grad_input = fp8.scaled_mm(gq, fp8.column_major(wq), sg_inv, sw_inv, _gemm_out_dtype(ctx.input_dtype))
        else:
            grad_input = (g_bf16 @ weight.to(torch.bfloat16)).to(_gemm_out_dtype(ctx.input_dtype))
        grad_input = grad_input.to(ctx.input_dtype).reshape(ctx.total_input_shape)
        local_dgrad = grad_input.clone() if ctx.shadow and dgrad8 else None  # the all-reduce below works in place
        # Start the input-gradient communication, then compute the weight gradient while it runs.
        handle, grad_input = _start_dgrad_comm(ctx, grad_input)

        grad_weight = None
        if needs_weight_grad:
            if wgrad8:
                # wgrad reduces over tokens: zero-pad them to the GEMM alignment.
                a = fp8.pad_rows(gq).t().contiguous()
                b = fp8.column_major(fp8.pad_rows(xq))
                grad_weight = fp8.scaled_mm(a, b, sg_inv, sx_inv, _gemm_out_dtype(ctx.weight_dtype))
            else:
                grad_weight = (g_bf16.t() @ x2d.to(torch.bfloat16)).float()
            if ctx.shadow:   # the GEMM's own result, before the injection's rows are scaled back
                _record_shadow(numerics, g2d, x2d, weight, local_dgrad, grad_weight if wgrad8 else None)
            if ctx.grad_scale is not None:
                grad_weight = grad_weight / ctx.grad_scale[:, None]
            grad_weight = grad_weight.to(ctx.weight_dtype)
        elif ctx.shadow:
            _record_shadow(numerics, g2d, x2d, weight, local_dgrad, None)
        grad_bias = grad_for_bias.sum(dim=0) if ctx.use_bias else None
        if grad_weight is not None and numerics.stats_level == "full":
            numerics.record_grad({"wgrad_sq": grad_weight.detach().float().square().sum()})

        if handle is not None:
            handle.wait()
        return grad_input if needs_input_grad else None, grad_weight, grad_bias, None, None, None, None, None, None


def _start_dgrad_comm(ctx, grad_input: torch.Tensor):
    """Megatron's input-gradient duty under TP: an async all-reduce (in place), or under sequence parallelism
    a reduce-scatter into this rank's sequence shard. Returns ``(handle or None, the tensor to return)``."""
    if ctx.allreduce_dgrad:
        return torch.distributed.all_reduce(grad_input, group=ctx.tp_group, async_op=True), grad_input
    if ctx.sequence_parallel:
        sub_grad_input = torch.empty(ctx.input_shape, dtype=grad_input.dtype, device=grad_input.device)
        handle = dist_reduce_scatter_func(sub_grad_input, grad_input.contiguous(), group=ctx.tp_group,
                                          async_op=True)
        return handle, sub_grad_input
    return None, grad_input


def _padded(rows: int) -> int:
    return rows + (-rows % fp8.GEMM_ALIGNMENT)


def _fused_forward(ctx, x2d, weight, bias, numerics: LayerNumerics, out_dtype, input_dtype, total_shape):
    """FP8 forward on CUDA through the fused kernels (``kernels.py``): the input is cast once into its
    row-major bytes (this GEMM) and its transposed, token-padded bytes (wgrad), and only the latter is kept
    for backward: 1 byte per input element. The weight is kept as the parameter itself (no copy) with its
    scale, and re-cast transposed in backward with that same scale, which gives the same bytes."""
    level, training = numerics.stats_level, numerics.training
    xq, xq_t, _, sx_inv = kernels.quantize(x2d, E4M3, numerics.scaling["input"], update=training, level=level,
                                           acc=numerics.acc("input"), transpose_rows=_padded(x2d.shape[0]),
                                           col_weight=numerics.partner_weights(x2d, weight, "input"))
    wq, _, sw, sw_inv = kernels.quantize(weight, E4M3, numerics.scaling["weight"], update=training,
                                         level=level, acc=numerics.acc("weight"),
                                         col_weight=numerics.partner_weights(x2d, weight, "weight"))
    y = fp8.scaled_mm(xq, wq.t(), sx_inv, sw_inv, out_dtype, use_fast_accum=True)
    del xq, wq
    ctx.fused = True
    ctx.shadow = numerics.shadow and training
    ctx.save_for_backward(xq_t, weight, sx_inv, sw, sw_inv, *((x2d,) if ctx.shadow else ()))
    y = y.to(input_dtype).reshape(*total_shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y


def _fused_backward(ctx, g2d):
    numerics: LayerNumerics = ctx.numerics
    xq_t, weight, sx_inv, sw, sw_inv, *shadow_input = ctx.saved_tensors
    rows = g2d.shape[0]
    gq, gq_t, _, sg_inv = kernels.quantize(g2d, E5M2, numerics.scaling["grad_output"], update=numerics.training,
                                           level=numerics.stats_level, acc=numerics.acc("grad_output"),
                                           transpose_rows=_padded(rows),
                                           col_weight=numerics.partner_weights(None, weight, "grad_output"))
    _, wq_t, _, _ = kernels.quantize(weight, E4M3, None, update=False, level="none", acc=None, write_q=False,
                                     transpose_rows=weight.shape[0], scale=sw)
    grad_input = fp8.scaled_mm(gq, wq_t.t(), sg_inv, sw_inv, _gemm_out_dtype(ctx.input_dtype))
    del wq_t
    grad_input = grad_input.to(ctx.input_dtype).reshape(ctx.total_input_shape)
    local_dgrad = grad_input.clone() if ctx.shadow else None
    handle, grad_input = _start_dgrad_comm(ctx, grad_input)
    grad_weight = None
    if ctx.needs_input_grad[1]:
        grad_weight = fp8.scaled_mm(gq_t, xq_t.t(), sg_inv, sx_inv, _gemm_out_dtype(ctx.weight_dtype))
        grad_weight = grad_weight.to(ctx.weight_dtype)
        if numerics.stats_level == "full":
            numerics.record_grad({"wgrad_sq": grad_weight.detach().float().square().sum()})
    grad_bias = g2d.sum(dim=0) if ctx.use_bias else None
    if ctx.shadow:
        _record_shadow(numerics, g2d, shadow_input[0], weight, local_dgrad, grad_weight)
    if handle is not None:
        handle.wait()
    grad_input = grad_input if ctx.needs_input_grad[0] else None
    return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def _record_shadow(numerics: LayerNumerics, g2d, x2d, weight, grad_input, grad_weight) -> None:
    """Gradient sensitivity: the same micro-batch's FP8 backward GEMMs (``grad_input`` from an FP8 dgrad,
    ``grad_weight`` from an FP8 wgrad; None for one that ran BF16) recomputed in BF16 and compared, per GEMM."""
    g = g2d.to(torch.bfloat16)
    values = {"shadow_count": torch.ones((), device=g2d.device)}
    if grad_input is not None:
        values.update(_shadow_sums("dgrad", grad_input.reshape(g2d.shape[0], -1), g @ weight.to(torch.bfloat16)))
    if grad_weight is not None:
        values.update(_shadow_sums("wgrad", grad_weight, g.t() @ x2d.to(torch.bfloat16)))
    numerics.record_grad(values)


def _shadow_sums(gemm: str, fp8_grad: torch.Tensor, ref_grad: torch.Tensor) -> dict[str, torch.Tensor]:
    a, b = fp8_grad.detach().float(), ref_grad.float()
    return {f"shadow_err_sq_{gemm}": (a - b).square().sum(), f"shadow_ref_sq_{gemm}": b.square().sum(),
            f"shadow_dot_{gemm}": (a * b).sum(), f"shadow_fp8_sq_{gemm}": a.square().sum()}


class PrecisionLinearMixin:
    """What the column- and row-parallel variants share: construction, the precision switch and the GEMM seam.
    Extra keywords over megatron's layer: ``scaling``; ``strict``: a layer that cannot run FP8 is an error at
    construction instead of a BF16 layer."""

    def __init__(self, input_size, output_size, *, scaling: ScalingConfig | None = None, strict: bool = False,
                 **kwargs):
        super().__init__(input_size, output_size, **kwargs)   # megatron's Column/RowParallelLinear
        role = kwargs.get("tp_comm_buffer_name")
        if self.config.gradient_accumulation_fusion:
            raise ValueError(
                f"{type(self).__name__} does not support gradient_accumulation_fusion; set it False in the "
                "TransformerConfig"
            )
        in_f, out_f = self.weight.shape[1], self.weight.shape[0]
        self.fp8_unsupported_reason = fp8.fp8_gemm_unsupported_reason(in_f, out_f)
        if strict and self.fp8_unsupported_reason:
            raise ValueError(f"{type(self).__name__} ({role or 'linear'}, weight {in_f} -> {out_f} on this rank) "
                             f"cannot run FP8: {self.fp8_unsupported_reason} (convert_layer_spec(strict=True))")
        self.numerics = LayerNumerics(scaling or ScalingConfig(), self.weight.device)
        self.gemm_flops_per_token = 6 * in_f * out_f  # forward + dgrad + wgrad, this rank's shard
        # GEMM-tokens through this layer by precision (FLOP_SLOT), counted on the device: a host integer
        # changing at every forward would make compiled code recompile at every call (``flops.py`` reads these
        # only when a share is asked for). Each GEMM is a third of the layer's FLOPs. Not in state_dict: the
        # runtime checkpoints it.
        self.register_buffer("flop_tokens", torch.zeros(2, dtype=torch.int64, device=self.weight.device),
                             persistent=False)
        self._gemm_precisions: tuple[str, str, str] = ("bf16", "bf16", "bf16")   # fprop, dgrad, wgrad
        # Function-preserving per-input-channel scale (fault injection ``outlier``, contract C6): x * s and W / s.
        self.channel_scale: torch.Tensor | None = None
        # Per-output-channel scale of the output gradient the backward GEMMs read (``grad_outlier``): dY * s,
        # with dgrad's weight rows / s and wgrad's rows / s, so exact (and BF16) arithmetic is unchanged.
        self.grad_channel_scale: torch.Tensor | None = None

    @property
    def gemm_precisions(self) -> dict[str, str]:
        """``{"fprop": p, "dgrad": p, "wgrad": p}``."""
        return dict(zip(GEMMS, self._gemm_precisions))

    @property
    def precision(self) -> str:
        """``"fp8"`` or ``"bf16"`` when the three GEMMs agree, else ``"mixed"``. Setting it sets all three."""
        return layer_precision(self._gemm_precisions)

    @precision.setter
    def precision(self, value: str) -> None:
        self.set_gemm_precisions(dict.fromkeys(GEMMS, value))

    def set_gemm_precisions(self, precisions: dict[str, str]) -> None:
        """Change some GEMMs (``{gemm: precision}``); the others keep theirs. An operand that no FP8 GEMM read
        before and one does now starts from fresh scaling state (never a stale amax history)."""
        for gemm, value in precisions.items():
            if gemm not in GEMMS:
                raise ValueError(f"unknown GEMM {gemm!r}: one of {GEMMS}")
            if value not in PRECISIONS:
                raise ValueError(f"precision must be one of {PRECISIONS}, got {value!r}")
            if value == "fp8" and self.fp8_unsupported_reason:
                raise ValueError(f"cannot run this layer in fp8: {self.fp8_unsupported_reason}")
        before = self.gemm_precisions
        after = {**before, **precisions}
        for role in OPERANDS:
            if not _quantized(before, role) and _quantized(after, role):
                self.numerics.scaling[role].reset()
        self._gemm_precisions = tuple(after[g] for g in GEMMS)

    @property
    def fp8_capable(self) -> bool:
        return self.fp8_unsupported_reason is None

    def _forward_impl(self, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                      sequence_parallel, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None):
        if grad_output_buffer is not None:
            raise ValueError(f"{type(self).__name__} does not support deferred embedding wgrad compute")
        if self.numerics.training != self.training:   # set on a change only: compiled code guards on it
            self.numerics.training = self.training
        if self.training:  # FLOP accounting covers training GEMMs, not evaluation
            tokens = input.numel() // input.shape[-1] * (tp_group.size() if sequence_parallel else 1)
            fp8_gemms = self._gemm_precisions.count("fp8")
            for slot, gemms in ((0, fp8_gemms), (1, 3 - fp8_gemms)):   # in place: one kernel a precision in use
                if gemms:
                    self.flop_tokens[slot].add_(tokens * gemms)
        if self.channel_scale is not None:
            input, weight = input * self.channel_scale, weight / self.channel_scale
        return PrecisionLinearFunction.apply(input, weight, bias, self.numerics, self._gemm_precisions,
                                             allreduce_dgrad, sequence_parallel, tp_group, self.grad_channel_scale)

    def extra_repr(self) -> str:
        p = self.precision
        return f"precision={p}" + (f" {self.gemm_precisions}" if p == MIXED else "")


def _quantized(precisions: dict[str, str], role: str) -> bool:
    """Whether ``role``'s tensor is quantized: some GEMM that reads it runs FP8."""
    return any(precisions[g] == "fp8" for g in READERS[role])


class PrecisionColumnParallelLinear(PrecisionLinearMixin, ColumnParallelLinear):
    """``ColumnParallelLinear`` with switchable FP8/BF16 GEMMs (``PrecisionLinearMixin``)."""


class PrecisionRowParallelLinear(PrecisionLinearMixin, RowParallelLinear):
    """``RowParallelLinear`` with switchable FP8/BF16 GEMMs (``PrecisionLinearMixin``)."""


PrecisionLinear = (PrecisionColumnParallelLinear, PrecisionRowParallelLinear)


# The attribute under which torch's FSDP1 (at every level it wraps) and its activation-checkpoint wrapper keep the
# module they wrap: not part of a layer's name (torch's own ``clean_tensor_name`` drops them too).
WRAPPER_COMPONENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside megatron's DistributedDataParallel / FSDP wrappers, ``Float16Module`` and torch's
    DistributedDataParallel (each keeps it as ``.module``, and megatron nests them: DDP(Float16Module(model))), so
    that layers are named as the model names them whatever wraps it. torch's FSDP1 adds a path component at every
    level it wraps (``WRAPPER_COMPONENTS``), dropped from the names; ``fully_shard`` (FSDP2) adds none."""
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel
    from megatron.core.transformer.module import Float16Module

    wrappers = (_BaseDataParallel, Float16Module, torch.nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def precision_layers(model: torch.nn.Module | list[torch.nn.Module]) -> dict[str, PrecisionLinearMixin]:
    """All managed layers of ``model`` (a module, or the list of a virtual pipeline's model chunks) by **global**
    name, in module order.

    A global name is the module path with two local indices made global, so that one name means one layer on
    every rank of any parallel layout: a transformer layer's index in its stage's ``layers`` list becomes its
    index in the whole model (``layer_number - 1``, which megatron offsets by pipeline and virtual stage), and a
    ``SequentialMLP``'s local expert index becomes the expert's global index (``ep_rank x num_local_experts +
    j``, the numbering megatron's own ``sharded_state_dict`` uses). Without pipeline or expert parallelism the
    global name is the module path. Wrappers add nothing to it (``unwrap_model``)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    out: dict[str, PrecisionLinearMixin] = {}
    for chunk in map(unwrap_model, chunks):
        renamed = _global_components(chunk)
        for path, module in chunk.named_modules():
            if not isinstance(module, PrecisionLinearMixin):
                continue
            parts, prefix = path.split("."), ""
            for i, part in enumerate(parts):
                prefix = f"{prefix}.{part}" if prefix else part
                parts[i] = renamed.get(prefix, part)
            name = ".".join(p for p in parts if p not in WRAPPER_COMPONENTS)
            if name in out:
                raise ValueError(f"two managed layers share the global name {name!r}: the model chunks overlap")
            out[name] = module
    return out


def _global_components(model: torch.nn.Module) -> dict[str, str]:
    """Module paths whose last component is a local index, mapped to the global index that replaces it."""
    renamed: dict[str, str] = {}
    for path, module in model.named_modules():
        last = path.rsplit(".", 1)[-1]
        number = getattr(module, "layer_number", None)
        if last.isdigit() and isinstance(number, int) and hasattr(module, "self_attention"):  # a TransformerLayer
            renamed[path] = str(number - 1)
        experts = getattr(module, "local_experts", None)
        if isinstance(experts, torch.nn.ModuleList) and hasattr(module, "ep_group"):    # a SequentialMLP
            offset = module.ep_group.rank() * module.num_local_experts
            for j in range(len(experts)):
                renamed[f"{path}.local_experts.{j}"] = str(offset + j)
    return renamed
