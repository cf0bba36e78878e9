"""Core attention on any device, and the key/value cache incremental decoding uses.

Megatron-core 0.16's ``DotProductAttention`` asks for a CUDA device; ``SDPACoreAttention`` is a drop-in
``core_attention`` built on ``torch.nn.functional.scaled_dot_product_attention`` that runs wherever torch does,
with grouped-query attention, megatron's boolean masks and an optional ``KVCache``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class KVCache:
    """The keys and values of the positions decoded so far, for one attention layer (``[s, b, groups, dim]``):
    incremental decoding appends each step's new ones instead of recomputing the whole sequence."""

    def __init__(self):
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def extend(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key is not None:
            key, value = torch.cat([self.key, key]), torch.cat([self.value, value])
        self.key, self.value = key, value
        return key, value


class SDPACoreAttention(MegatronModule):
    """Core attention through ``torch.nn.functional.scaled_dot_product_attention``: runs on CPU and CUDA.

    Same constructor and forward contract as Megatron's ``DotProductAttention`` (which allocates on the CUDA
    device). Inputs ``[s, b, heads, head_dim]``; output ``[s_q, b, heads * head_dim]``. Supports grouped
    query attention and queries that are a suffix of the keys (decoding with a KV cache).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        tp = parallel_state.get_tensor_model_parallel_world_size() if pg_collection is None else pg_collection.tp.size()
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.kv_cache: KVCache | None = None   # set while a rollout engine decodes incrementally

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor attention bias")
        if self.kv_cache is not None:   # the queries are the newest positions; keys and values span all so far
            key, value = self.kv_cache.extend(key, value)
        sq, b, heads, hd = query.shape
        sk = key.shape[0]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type or self.attn_mask_type
        mask, is_causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask  # Megatron: True = masked out; SDPA: True = attend
        elif mask_type == AttnMaskType.causal:
            if sq == sk:
                is_causal = True
            else:  # queries are the last sq positions: align the causal diagonal bottom-right
                mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(diagonal=sk - sq)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.groups_per_partition != self.heads_per_partition,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hd)
