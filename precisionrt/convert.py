"""``convert_layer_spec``: put precisionrt's switchable linears into any megatron-core layer spec.

In the manner of torchao's ``convert_to_float8_training``, but at the spec: Megatron builds modules from
``ModuleSpec`` trees, so the converter walks the tree and swaps ``ColumnParallelLinear`` /
``RowParallelLinear`` for ``PrecisionColumnParallelLinear`` / ``PrecisionRowParallelLinear`` (same constructor,
same forward contract, same parameters). The input spec is not modified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import precisionrt.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from precisionrt.linear import PrecisionColumnParallelLinear, PrecisionRowParallelLinear

_SWAP = {ColumnParallelLinear: PrecisionColumnParallelLinear, RowParallelLinear: PrecisionRowParallelLinear}


def convert_layer_spec(spec, filter_fn: Callable[[str], bool] | None = None, *, cpu_attention: bool = False):
    """A copy of ``spec`` whose column/row-parallel linears are precisionrt's.

    ``filter_fn(path)`` decides per position (``path`` like ``"self_attention.linear_qkv"``); by default every
    linear is converted. ``cpu_attention=True`` also replaces megatron's ``DotProductAttention``, which
    allocates on the CUDA device, by ``SDPACoreAttention`` (CPU and CUDA), so the model runs on a CPU too.
    Transformer Engine modules (fused norm + linear) cannot be converted: they are an error naming their path.
    """
    return _convert(spec, "", filter_fn or (lambda path: True), cpu_attention)


def _convert(node, path: str, keep: Callable[[str], bool], cpu_attention: bool):
    if isinstance(node, ModuleSpec):
        module = _convert_class(node.module, path, keep, cpu_attention)
        sub = node.submodules
        if sub is not None and dataclasses.is_dataclass(sub) and not isinstance(sub, type):
            sub = dataclasses.replace(sub, **{
                f.name: _convert(getattr(sub, f.name), _join(path, f.name), keep, cpu_attention)
                for f in dataclasses.fields(sub)})
        return dataclasses.replace(node, module=module, submodules=sub)
    if isinstance(node, (list, tuple)):   # e.g. TransformerBlockSubmodules.layer_specs
        return type(node)(_convert(n, _join(path, str(i)), keep, cpu_attention) for i, n in enumerate(node))
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.replace(node, **{f.name: _convert(getattr(node, f.name), _join(path, f.name), keep,
                                                             cpu_attention) for f in dataclasses.fields(node)})
    if isinstance(node, type):
        return _convert_class(node, path, keep, cpu_attention)
    return node


def _convert_class(cls, path: str, keep: Callable[[str], bool], cpu_attention: bool):
    if not isinstance(cls, type):
        return cls
    if cls in _SWAP:
        return _SWAP[cls] if keep(path) else cls
    if cls.__name__.startswith("TE") and "Linear" in cls.__name__:
        raise ValueError(f"{path}: {cls.__name__} is a Transformer Engine module; precisionrt converts megatron's "
                         "local ColumnParallelLinear/RowParallelLinear (use get_gpt_layer_local_spec)")
    if cpu_attention and cls.__name__ == "DotProductAttention":
        from precisionrt.megatron import SDPACoreAttention

        return SDPACoreAttention
    return cls


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
