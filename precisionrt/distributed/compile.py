"""``torch.compile`` for a converted model: the whole model, as torchao users do after
``convert_to_float8_training``, or one region per transformer block, as torchtitan does.

What makes the layers compile (``fullgraph=True``: no graph break in forward or backward, in every precision
mode): every piece of state the FP8 path updates is a tensor updated in place (``fp8.ScalingState``: scale, amax
history, its cursor; the statistics buffers of ``numerics.py``; the FLOP token counters of ``linear.py``), so
compiled code mutates them as eager code does and nothing on the host changes from call to call. Under
``torch.compile`` the FP8 path takes the eager reference operations (not the Triton kernels): inductor fuses them.

What a graph depends on, and so what recompiles: each layer's precision, its statistics level on that step
(none / cheap / full, the shadow flag of dynamic mode's sampled steps), train or eval, and tensor shapes. Each
combination is compiled once and kept: a precision switch compiles one new graph for the region that holds the
layer, a layer returning to a precision seen before reuses the old graph, and no ordinary step recompiles. Per
block (``regions="block"``) a switch touches one block's graph; whole-model compilation (``"model"``) recompiles
the model once per new combination of all layers. All blocks share one code object, so dynamo's per-code cache
must hold every combination in use: ``compile_model`` raises its limit to ``cache_size``.
"""

from __future__ import annotations

from typing import Literal

import torch


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer layers (megatron's ``TransformerLayer``: a module with ``self_attention`` and
    ``mlp``), in module order."""
    return [m for m in model.modules() if hasattr(m, "self_attention") and hasattr(m, "mlp")]


def compile_model(model: torch.nn.Module, regions: Literal["block", "model"] = "block", *, backend: str = "inductor",
                  fullgraph: bool = True, cache_size: int = 64, **options) -> torch.nn.Module:
    """Compile a model whose linears are precisionrt's. ``regions="block"`` compiles each transformer block in
    place (``Module.compile``) and returns ``model``; ``"model"`` returns ``torch.compile(model)``. ``options``
    go to ``torch.compile`` (``mode``, ``dynamic``, ...). Raises dynamo's per-code cache limit to
    ``cache_size`` (never lowers it): a graph per combination of precisions and statistics levels in use."""
    if regions not in ("block", "model"):
        raise ValueError(f"regions must be 'block' or 'model', got {regions!r}")
    config = torch._dynamo.config
    config.cache_size_limit = max(config.cache_size_limit, cache_size)
    config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, 4 * cache_size)
    if regions == "model":
        return torch.compile(model, backend=backend, fullgraph=fullgraph, **options)
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError("compile_model(regions='block'): the model has no transformer block (a module with "
                         "self_attention and mlp); use regions='model'")
    for block in blocks:
        block.compile(backend=backend, fullgraph=fullgraph, **options)
    return model
