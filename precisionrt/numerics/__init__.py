"""Numerics, floor 1: how a number is stored in FP8 and how a GEMM runs on it. Torch only.

Formats. E4M3 (``torch.float8_e4m3fn``) has 3 mantissa bits and reaches 448; E5M2 (``torch.float8_e5m2``)
has 2 and reaches 57344. The forward pass stores activations and weights in E4M3 (precision matters more than
range); the backward pass stores output gradients in E5M2 (their range is wider and drifts): Transformer
Engine's HYBRID recipe.

Scales. A tensor ``x`` is stored as ``q = saturate(round(x * s))`` with one fp32 scale ``s`` per tensor,
``s = (fp8_max / amax) / 2**margin``: its largest magnitude lands just under the format's maximum. ``amax``
comes from the tensor itself (current scaling) or from a history of earlier steps (delayed scaling); an amax of
0 or non-finite keeps the previous scale. A GEMM multiplies quantized operands and divides by both scales
(``torch._scaled_mm`` takes the inverses). What does not fit is either clipped (overflow: ``|x| s > max``) or
flushed (underflow: a nonzero ``x`` that becomes 0); both are counted, before the cast, with the non-finite
values that the cast would hide (this CPU's E4M3 cast maps +inf to 448).

Modules: ``fp8.py`` (formats, scaling recipe, saturating quantization (contract C1), the statistics of one
quantization, and the one ``_scaled_mm`` call site, which checks Hopper's layout rules on every device);
``kernels.py`` (fused Triton quantization for CUDA, with the eager path as its reference); ``state.py`` (a
layer's scaling state per tensor role and its on-device statistics buffers).

May import: ``precisionrt.config`` and torch. Nothing of megatron.
"""
