"""``convert_layer_spec``: put precisionrt's switchable linears into any megatron-core layer spec.

In the manner of torchao's ``convert_to_float8_training``, but at the spec: Megatron builds modules from
``ModuleSpec`` trees, so the converter walks the tree and swaps ``ColumnParallelLinear`` /
``RowParallelLinear`` for ``PrecisionColumnParallelLinear`` / ``PrecisionRowParallelLinear`` (same constructor,
same forward contract, same parameters). The input spec is not modified.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from precisionrt.layers.linear import PrecisionColumnParallelLinear, PrecisionRowParallelLinear

_SWAP = {ColumnParallelLinear: PrecisionColumnParallelLinear, RowParallelLinear: PrecisionRowParallelLinear}
_GROUPED_EXPERTS = ("GroupedMLP", "TEGroupedMLP")   # megatron's grouped-GEMM experts: no linear to swap inside
log = logging.getLogger(__name__)


def convert_layer_spec(spec, filter_fn: Callable[[str], bool] | None = None, *, cpu_attention: bool = False,
                       strict: bool = False):
    """A copy of ``spec`` whose column/row-parallel linears are precisionrt's.

    ``filter_fn(path)`` decides per position (``path`` like ``"self_attention.linear_qkv"``); by default every
    linear is converted. Positions it leaves as megatron's linears are named in one warning. ``strict=True``
    makes every layer left out of FP8 an error instead: a filtered-out position here, and a layer whose
    dimensions FP8 GEMMs cannot take when the model is built (the runtime otherwise warns about those, by
    name, when it starts). ``cpu_attention=True`` also replaces megatron's ``DotProductAttention``, which
    allocates on the CUDA device, by ``SDPACoreAttention`` (CPU and CUDA), so the model runs on a CPU too.
    Transformer Engine modules (fused norm + linear) and grouped-GEMM MoE experts (``GroupedMLP``) cannot be
    converted: they are an error naming their path (``SequentialMLP`` experts are converted, one layer each).
    """
    left: list[str] = []
    converted = _Converter(filter_fn or (lambda path: True), cpu_attention, strict, left).node(spec, "")
    if left and strict:
        raise ValueError(f"convert_layer_spec(strict=True): {len(left)} linear position(s) filtered out of "
                         f"precisionrt's layers: {left}")
    if left:
        log.warning("convert_layer_spec: %d linear position(s) left as megatron's (BF16, not managed), filtered "
                    "out by filter_fn: %s", len(left), left)
    return converted


@dataclasses.dataclass
class _Converter:
    keep: Callable[[str], bool]
    cpu_attention: bool
    strict: bool
    left: list[str]

    def node(self, node, path: str):
        if isinstance(node, ModuleSpec):
            module = self.cls(node.module, path)
            sub = node.submodules
            if sub is not None and dataclasses.is_dataclass(sub) and not isinstance(sub, type):
                sub = dataclasses.replace(sub, **{f.name: self.node(getattr(sub, f.name), _join(path, f.name))
                                                  for f in dataclasses.fields(sub)})
            params = node.params
            if self.strict and module in _SWAP.values():
                params = {**(params or {}), "strict": True}
            return dataclasses.replace(node, module=module, submodules=sub, params=params)
        if isinstance(node, (list, tuple)):   # e.g. TransformerBlockSubmodules.layer_specs
            return type(node)(self.node(n, _join(path, str(i))) for i, n in enumerate(node))
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            return dataclasses.replace(node, **{f.name: self.node(getattr(node, f.name), _join(path, f.name))
                                                for f in dataclasses.fields(node)})
        if isinstance(node, type):
            cls = self.cls(node, path)
            return ModuleSpec(module=cls, params={"strict": True}) if self.strict and cls in _SWAP.values() else cls
        return node

    def cls(self, cls, path: str):
        if not isinstance(cls, type):
            return cls
        if cls in _SWAP:
            if self.keep(path):
                return _SWAP[cls]
            self.left.append(path)
            return cls
        if cls.__name__ in _GROUPED_EXPERTS:
            raise ValueError(f"{path}: {cls.__name__} runs every expert in one grouped GEMM, which precisionrt does not "
                             "convert (its experts would stay unmanaged); build the MoE layer with SequentialMLP "
                             "experts instead (get_gpt_layer_local_spec(..., moe_grouped_gemm=False)), whose "
                             "per-expert linears are converted and switch one by one")
        if cls.__name__.startswith("TE") and "Linear" in cls.__name__:
            raise ValueError(f"{path}: {cls.__name__} is a Transformer Engine module; precisionrt converts "
                             "megatron's local ColumnParallelLinear/RowParallelLinear (use get_gpt_layer_local_spec)")
        if self.cpu_attention and cls.__name__ == "DotProductAttention":
            from precisionrt.layers.attention import SDPACoreAttention

            return SDPACoreAttention
        return cls


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
