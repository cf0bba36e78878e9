"""The model factory: ``ModelConfig`` (the ``[model]`` table) and ``build_gpt``, a megatron-core
``GPTModel`` with PrecisionLinear layers, byte-level by default or a Hugging Face family (``models/hf``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from precisionrt.config import Checked, Range, Text
from precisionrt.layers.spec import precision_layer_spec
from precisionrt.models.transformer import megatron_transformer_config, place_model
from precisionrt.numerics.fp8 import ScalingConfig


_DIMS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size",
         "normalization", "swiglu", "position_embedding")
"""The architecture keys a Hugging Face checkpoint (``hf_path``) decides."""


@dataclass
class ModelConfig(Checked):
    """The policy's architecture: a byte-level Megatron GPT by default; a Hugging Face family at these
    dimensions (``hf_init``); or a local Hugging Face checkpoint (``hf_path``), whose config.json gives the
    dimensions. Dimensions of managed layers should be multiples of 16 to run in FP8."""

    num_layers: Annotated[int, Range(ge=1, le=1024)] = 4
    hidden_size: Annotated[int, Range(ge=1, le=2**17)] = 128
    num_attention_heads: Annotated[int, Range(ge=1, le=1024)] = 4
    num_query_groups: Annotated[int, Range(ge=0, le=1024)] = 0
    """Key/value heads (grouped-query attention) of an ``hf_init`` model; 0: one per attention head."""
    ffn_hidden_size: Annotated[int, Range(ge=1, le=2**20)] = 256
    seq_length: Annotated[int, Range(ge=1, le=2**20)] = 128
    vocab_size: Annotated[int, Range(ge=1, le=2**22)] = 256
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    swiglu: bool = True
    # megatron-core 0.16 moves RoPE frequencies to the CUDA device: "rope" needs a GPU (Hugging Face
    # families use precisionrt.layers.rope instead, on any device).
    position_embedding: Literal["learned_absolute", "rope"] = "learned_absolute"
    init_std: Annotated[float, Range(gt=0, le=10)] = 0.02
    # "float32": fp32 parameters (the optimizer updates them directly; the master copy). "bfloat16": bf16
    # parameters and activations throughout, as in the GPU benchmarks' shape.
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    hf_path: Annotated[str, Text("a local Hugging Face checkpoint directory ('' for none)", pattern=r"[^\n]*")] = ""
    """Load the policy from this directory (config.json and safetensors; ``precisionrt.from_hf``): its
    config.json decides the architecture keys, which are then left unset. Nothing is downloaded."""
    hf_exported_pins: bool = True
    """An FP8 export at ``hf_path`` (``train.export_hf_quantization = "fp8"``) resumes at the precision it was
    served in: the layers it kept in BF16 join ``precision.pin_bf16`` (a layer ``precision.pin_fp8`` names keeps
    that pin instead). ``false``: every layer starts as ``precision.mode`` says."""
    hf_init: Literal["", "llama", "qwen2", "qwen3"] = ""
    """A randomly initialised model of this Hugging Face family at this table's dimensions, built through the
    same import path as ``hf_path`` (and exported the same way)."""
    tokenizer_path: Annotated[str, Text("a local tokenizer directory ('' for the default)", pattern=r"[^\n]*")] = ""
    """A Hugging Face tokenizer directory (tokenizer.json, with a chat template for the RL tasks); default:
    ``hf_path``'s own, else bytes (UTF-8 bytes as tokens 0..255)."""

    def validate(self) -> None:
        if self.hf_path and self.hf_init:
            raise ValueError(f"hf_path ({self.hf_path!r}) and hf_init ({self.hf_init!r}) are two sources of the "
                             "model; set one")
        if self.hf_path:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for key in _DIMS:
                if getattr(self, key) != defaults[key]:
                    raise ValueError(f"{key} = {getattr(self, key)!r}: the checkpoint at hf_path decides it "
                                     "(its config.json); leave it unset")
            from precisionrt.models.hf.arch import HFCheckpointError

            try:   # a directory that is no checkpoint, or one that cannot be loaded: refused now
                self.hf_arch()
            except HFCheckpointError as e:
                raise ValueError(f"hf_path: {e}") from None
            return
        if self.hf_init and self.position_embedding != "learned_absolute":
            raise ValueError("position_embedding: Hugging Face families (hf_init) always use RoPE; leave it unset")
        if self.hf_init and (self.normalization != "RMSNorm" or not self.swiglu):
            raise ValueError("hf_init: the Hugging Face families use RMSNorm and SwiGLU; leave normalization "
                             "and swiglu unset")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads}): each head gets hidden_size / heads channels")
        if self.num_query_groups and self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_query_groups ({self.num_query_groups}) must divide num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_query_groups and not self.hf_init:
            raise ValueError("num_query_groups: grouped-query attention is built for Hugging Face families only "
                             "(set hf_init)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.params_dtype]

    @property
    def is_hf(self) -> bool:
        return bool(self.hf_path or self.hf_init)

    def hf_arch(self, tensor_parallel_size: int = 1):
        """The ``precisionrt.models.hf.arch.HFArch`` of an ``hf_path`` or ``hf_init`` model (``HFCheckpointError`` for
        a checkpoint that cannot be loaded)."""
        from precisionrt.models.hf.arch import HFArch, init_config

        if self.hf_path:
            return HFArch.from_dir(self.hf_path, tensor_parallel_size)
        if not self.hf_init:
            raise ValueError("hf_arch: neither hf_path nor hf_init is set")
        return HFArch.from_config(init_config(
            self.hf_init, num_layers=self.num_layers, hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_query_groups or
            self.num_attention_heads, ffn_hidden_size=self.ffn_hidden_size, vocab_size=self.vocab_size,
            max_position_embeddings=self.seq_length, init_std=self.init_std, dtype=self.params_dtype),
            tensor_parallel_size, where="model.hf_init")

    def dims(self) -> "ModelConfig":
        """This model's dimensions as a plain config (for memory estimates): those of the checkpoint under
        ``hf_path``, else these."""
        if not self.hf_path:
            return dataclasses.replace(self, hf_init="", num_query_groups=0)
        arch = self.hf_arch()
        return dataclasses.replace(
            self, hf_path="", num_layers=arch.num_layers, hidden_size=arch.hidden_size,
            num_attention_heads=arch.num_attention_heads, ffn_hidden_size=arch.ffn_hidden_size,
            vocab_size=arch.vocab_size)


def transformer_config(cfg: ModelConfig, tensor_parallel_size: int = 1, params_dtype: torch.dtype | None = None,
                       device: str | torch.device = "cpu", pipeline_parallel_size: int = 1) -> TransformerConfig:
    """Megatron's config for ``device``. On CPU every CUDA-only fusion is off; on CUDA the fusions that
    megatron-core offers without Transformer Engine or Apex are on (bias-dropout-add, SwiGLU, native fused
    vocab-parallel cross-entropy). RoPE fusion and gradient-accumulation fusion need Transformer Engine or
    Apex kernels (and the latter writes main grads PrecisionLinear does not produce): off."""
    return megatron_transformer_config(
        device, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, ffn_hidden_size=cfg.ffn_hidden_size,
        normalization=cfg.normalization, gated_linear_unit=cfg.swiglu,
        activation_func=F.silu if cfg.swiglu else F.gelu, init_method_std=cfg.init_std,
        tensor_model_parallel_size=tensor_parallel_size, params_dtype=params_dtype or cfg.torch_dtype,
        pipeline_model_parallel_size=pipeline_parallel_size, pipeline_dtype=params_dtype or cfg.torch_dtype)


def build_gpt(cfg: ModelConfig, scaling: ScalingConfig | None = None, tensor_parallel_size: int = 1,
              params_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
              load_weights: bool = True) -> GPTModel:
    """A megatron-core GPTModel with PrecisionLinear layers (all starting in BF16) on ``device``. Needs
    ``init_parallel``. Initialised on the CPU and then moved, so a seed gives the same weights everywhere.
    ``cfg.hf_path``: the checkpoint's model and weights (``load_weights=False``: its architecture only, for a
    copy that is filled by weight sync); ``cfg.hf_init``: that family, randomly initialised."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call precisionrt.distributed.parallel.init_parallel(...) before building a model")
    if cfg.is_hf:
        from precisionrt.models import hf

        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp != tensor_parallel_size:
            raise ValueError(f"build_gpt: tensor_parallel_size {tensor_parallel_size}, but megatron's parallel "
                             f"state has {tp}")
        dtype = params_dtype or cfg.torch_dtype
        if cfg.hf_path and load_weights:
            return hf.from_hf(cfg.hf_path, scaling=scaling, dtype=dtype, device=device)
        return hf.build_from_arch(cfg.hf_arch(tp), scaling=scaling, dtype=dtype, device=device)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if cfg.num_layers % pp:
        raise ValueError(f"num_layers ({cfg.num_layers}) must be divisible by the pipeline size ({pp})")
    model = GPTModel(   # under pipeline parallelism: this stage's layers, the embedding first, the head last
        config=transformer_config(cfg, tensor_parallel_size, params_dtype, device, pp),
        transformer_layer_spec=precision_layer_spec(scaling),
        vocab_size=cfg.vocab_size, max_sequence_length=cfg.seq_length,
        position_embedding_type=cfg.position_embedding,
        share_embeddings_and_output_weights=False,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
    )
    return place_model(model, params_dtype or cfg.torch_dtype, device)


def gemm_shapes(cfg: ModelConfig, tensor_parallel_size: int = 1) -> dict[str, tuple[int, int]]:
    """(K, N) of each managed linear of a transformer layer, on one tensor-parallel shard, from the configuration
    alone (no model is built: a table for an 8B model is measured without its weights): column-parallel layers
    split N, row-parallel ones K."""
    tp = tensor_parallel_size
    if cfg.is_hf:
        arch = cfg.hf_arch(tp)
        hidden, heads, groups, head_dim, ffn, gated = (arch.hidden_size, arch.num_attention_heads,
                                                       arch.num_key_value_heads, arch.head_dim,
                                                       arch.ffn_hidden_size, True)
    else:
        hidden, heads, ffn, gated = cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size, cfg.swiglu
        groups, head_dim = heads, cfg.hidden_size // cfg.num_attention_heads
    return {"linear_qkv": (hidden, (heads + 2 * groups) * head_dim // tp),
            "linear_proj": (heads * head_dim // tp, hidden),
            "linear_fc1": (hidden, (2 if gated else 1) * ffn // tp),
            "linear_fc2": (ffn // tp, hidden)}
