"""Megatron-core integration: a GPT layer spec built on PrecisionLinear, a device-agnostic core attention,
and helpers that bring up torch.distributed/parallel_state and build a small GPTModel.

The spec puts ``PrecisionColumnParallelLinear`` at ``linear_qkv`` and ``linear_fc1`` and
``PrecisionRowParallelLinear`` at ``linear_proj`` and ``linear_fc2``. The embedding and the output head are
Megatron's own modules and run in the model's dtype, as DeepSeek-V3 and torchtitan keep them.
"""

from __future__ import annotations

import fnmatch
import os
import socket
import warnings
import dataclasses
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

import precisionrt.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.utils import divide

from precisionrt.config import Checked, ConfigError, Range, Text
from precisionrt.fp8 import ScalingConfig
from precisionrt.linear import PrecisionColumnParallelLinear, PrecisionRowParallelLinear, precision_layers


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
    # families use precisionrt.rope instead, on any device).
    position_embedding: Literal["learned_absolute", "rope"] = "learned_absolute"
    init_std: Annotated[float, Range(gt=0, le=10)] = 0.02
    # "float32": fp32 parameters (the optimizer updates them directly; the master copy). "bfloat16": bf16
    # parameters and activations throughout, as in the GPU benchmarks' shape.
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    hf_path: Annotated[str, Text("a local Hugging Face checkpoint directory ('' for none)", pattern=r"[^\n]*")] = ""
    """Load the policy from this directory (config.json and safetensors; ``precisionrt.from_hf``): its
    config.json decides the architecture keys, which are then left unset. Nothing is downloaded."""
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
            from precisionrt.hf_arch import HFCheckpointError

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
        """The ``precisionrt.hf_arch.HFArch`` of an ``hf_path`` or ``hf_init`` model (``HFCheckpointError`` for
        a checkpoint that cannot be loaded)."""
        from precisionrt.hf_arch import HFArch, init_config

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


def megatron_transformer_config(device: str | torch.device, **dims) -> TransformerConfig:
    """A ``TransformerConfig`` of ``dims`` with this project's settings for ``device``: no bias on the
    linears and no dropout unless ``dims`` say otherwise, CPU initialisation, and the fusions ``device``
    can run (see ``transformer_config``)."""
    cuda = torch.device(device).type == "cuda"
    settings = dict(add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
                    use_cpu_initialization=True, masked_softmax_fusion=False, persist_layer_norm=False,
                    gradient_accumulation_fusion=False, apply_rope_fusion=False,
                    bias_dropout_fusion=cuda, cross_entropy_loss_fusion=cuda,
                    # the synchronize after batched pipeline send/receive guards a CUDA stream race
                    batch_p2p_sync=cuda,
                    bias_activation_fusion=cuda and dims.get("gated_linear_unit", False))
    settings.update(dims)
    with warnings.catch_warnings():  # megatron-core 0.16 warns about its own default cuda_graph_scope
        warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
        return TransformerConfig(**settings)


def build_gpt(cfg: ModelConfig, scaling: ScalingConfig | None = None, tensor_parallel_size: int = 1,
              params_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
              load_weights: bool = True) -> GPTModel:
    """A megatron-core GPTModel with PrecisionLinear layers (all starting in BF16) on ``device``. Needs
    ``init_parallel``. Initialised on the CPU and then moved, so a seed gives the same weights everywhere.
    ``cfg.hf_path``: the checkpoint's model and weights (``load_weights=False``: its architecture only, for a
    copy that is filled by weight sync); ``cfg.hf_init``: that family, randomly initialised."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call precisionrt.megatron.init_parallel(...) before building a model")
    if cfg.is_hf:
        from precisionrt import hf

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


def place_model(model: GPTModel, dtype: torch.dtype, device: str | torch.device) -> GPTModel:
    """Cast a freshly built model to ``dtype`` and move it to ``device``, its layers' numerics state with it."""
    # Megatron's torch norms are created in fp32 whatever params_dtype says; a bf16 model must not run its
    # norms (and, through type promotion, every activation after them) in fp32.
    model.to(dtype=dtype)
    if torch.device(device).type != "cpu":
        model.to(device)
        for layer in precision_layers(model).values():   # numerics state follows its layer's weight
            layer.numerics = type(layer.numerics)(layer.numerics.scaling_config, layer.weight.device)
    return model


def resolve_device(name: str) -> torch.device:
    """``run.device``: ``auto`` is CUDA when a GPU is visible, else CPU. Under torchrun each rank takes the
    GPU of its ``LOCAL_RANK``. Asking for ``cuda`` without a GPU is an error that says so."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"run.device: {name!r} is not one of ['auto', 'cpu', 'cuda']")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' was asked for but torch sees no CUDA device "
                          f"(torch {torch.__version__}); use run.device=\"cpu\" or \"auto\"")
    index = int(os.environ.get("LOCAL_RANK", 0))
    if index >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {index} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _free_localhost_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(tensor_parallel_size: int = 1, seed: int = 0, device: str | torch.device = "cpu",
                  pipeline_parallel_size: int = 1) -> None:
    """Bring up torch.distributed (gloo for ``device`` CPU, nccl for CUDA) and Megatron's parallel state.

    Under ``torchrun`` the launcher's rendezvous is used; a plain process becomes a world of one bound to
    localhost. Idempotent for the same tensor- and pipeline-parallel sizes.
    """
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            torch.distributed.init_process_group(backend=backend)
        else:
            torch.distributed.init_process_group(
                backend=backend, init_method=f"tcp://127.0.0.1:{_free_localhost_port()}", rank=0, world_size=1
            )
    world = torch.distributed.get_world_size()
    if world % (tensor_parallel_size * pipeline_parallel_size):
        raise ValueError(f"world size {world} is not divisible by tensor_model_parallel_size {tensor_parallel_size} "
                         f"x pipeline_model_parallel_size {pipeline_parallel_size}")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size()) != (tensor_parallel_size,
                                                                            pipeline_parallel_size):
            parallel_state.destroy_model_parallel()
        else:
            return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size,
                                             pipeline_model_parallel_size=pipeline_parallel_size)
    if torch.device(device).type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def match_layers(model: torch.nn.Module, patterns: list[str], what: str = "pattern") -> list[str]:
    """Managed layer names of ``model`` matching any fnmatch pattern; a pattern that matches nothing is an error."""
    return match_names(list(precision_layers(model)), patterns, what)


def match_names(names: list[str], patterns: list[str], what: str = "pattern") -> list[str]:
    """The ``names`` matching any fnmatch pattern; a pattern that matches nothing is an error."""
    matched: list[str] = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(
                f"{what} {pat!r} matches no managed layer; layers are e.g. {names[:2]} ... ({len(names)} in all)"
            )
        matched.extend(h for h in hits if h not in matched)
    return matched
