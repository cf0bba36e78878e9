"""The GPT transformer-layer spec whose four GEMM-bearing linears are PrecisionLinear (the spec
``precisionrt.models`` builds its models from; ``convert.py`` converts any other spec)."""

from __future__ import annotations

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from precisionrt.layers.attention import SDPACoreAttention
from precisionrt.layers.linear import PrecisionColumnParallelLinear, PrecisionRowParallelLinear
from precisionrt.numerics.fp8 import ScalingConfig


def precision_layer_spec(scaling: ScalingConfig | None = None, *, qk_layernorm: bool = False,
                         precision: bool = True) -> ModuleSpec:
    """A GPT transformer-layer spec whose four GEMM-bearing linears are PrecisionLinear.

    ``qk_layernorm``: a per-head norm on queries and keys (Qwen3). ``precision=False``: megatron's own
    ColumnParallelLinear/RowParallelLinear at the same positions (GEMMs in the parameters' dtype), the
    reference the HF oracle tests compare in float32.
    """
    if precision:
        lin = {"scaling": scaling} if scaling is not None else {}
        col = ModuleSpec(module=PrecisionColumnParallelLinear, params=lin)
        row = ModuleSpec(module=PrecisionRowParallelLinear, params=lin)
    else:
        col, row = ColumnParallelLinear, RowParallelLinear
    qk_norm = WrappedTorchNorm if qk_layernorm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=col, core_attention=SDPACoreAttention, linear_proj=row,
                    q_layernorm=qk_norm, k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
