"""What a Hugging Face ``config.json`` asks for, read as plain JSON and checked before any weight is read.

``HFArch.from_config`` turns the config of a Llama, Qwen2/Qwen2.5 or Qwen3 checkpoint into the handful of
facts the importer needs (dimensions, norms, biases, RoPE, tied head), and refuses what precisionrt cannot
represent exactly, naming the field and its value: an unknown ``model_type``, a rope type other than
default/linear/llama3, partial rotary, sliding-window attention, mixture-of-experts fields, biases on other
linears than Qwen2's q/k/v, a non-SiLU activation, or a head/ffn/vocab count the tensor-parallel size does
not divide.

The config is read as JSON, not through ``transformers.AutoConfig``, on purpose: old checkpoints keep RoPE in
``rope_theta`` + ``rope_scaling``, transformers 5 writes ``rope_parameters``; both are read here, so that a
scaling setting can never be dropped by a key that moved (mbridge 0.15.1 drops Llama 3's this way).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from precisionrt.layers.rope import SUPPORTED_ROPE_TYPES

FAMILIES = ("llama", "qwen2", "qwen3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_ROPE_THETA = {"llama": 500000.0, "qwen2": 1000000.0, "qwen3": 1000000.0}   # the families' released values


def init_config(family: str, *, num_layers: int, hidden_size: int, num_attention_heads: int,
                num_key_value_heads: int, ffn_hidden_size: int, vocab_size: int, max_position_embeddings: int,
                init_std: float = 0.02, dtype: str = "float32", tie_word_embeddings: bool = False) -> dict:
    """The config.json of a ``family`` model at these dimensions, as ``transformers`` would write it (with the
    family's released RoPE base and norm epsilon): what ``model.hf_init`` builds, and exports."""
    if family not in FAMILIES:
        raise HFCheckpointError(f"model.hf_init = {family!r}: not a family precisionrt builds (supported: "
                                f"{list(FAMILIES)})")
    cfg = {"architectures": [ARCHITECTURES[family]], "model_type": family, "hidden_size": hidden_size,
           "num_hidden_layers": num_layers, "num_attention_heads": num_attention_heads,
           "num_key_value_heads": num_key_value_heads, "intermediate_size": ffn_hidden_size,
           "vocab_size": vocab_size, "max_position_embeddings": max_position_embeddings,
           "hidden_act": "silu", "rms_norm_eps": 1e-6, "initializer_range": init_std,
           "rope_theta": _ROPE_THETA[family], "tie_word_embeddings": tie_word_embeddings, "dtype": dtype,
           "attention_dropout": 0.0}
    if family == "qwen3":
        cfg["head_dim"] = hidden_size // num_attention_heads
    if family == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


class HFCheckpointError(ValueError):
    """A checkpoint precisionrt cannot load exactly; the message names the file or field and its value."""


@dataclass(frozen=True)
class HFArch:
    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    norm_eps: float
    rope: dict
    tie_word_embeddings: bool
    max_position_embeddings: int
    qkv_bias: bool           # Qwen2 / Qwen2.5
    qk_layernorm: bool       # Qwen3
    dtype: str               # the checkpoint's parameter dtype
    init_std: float = 0.02
    raw: dict = field(default_factory=dict, compare=False, repr=False)   # config.json as read

    @classmethod
    def from_config(cls, cfg: dict, tensor_parallel_size: int = 1, where: str = "config.json") -> "HFArch":
        def refuse(key: str, why: str):
            raise HFCheckpointError(f"{where}: {key} = {cfg.get(key)!r}: {why}")

        model_type = cfg.get("model_type")
        if model_type not in FAMILIES:
            refuse("model_type", f"not a family precisionrt imports (supported: {list(FAMILIES)})")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if not isinstance(cfg.get(key), int) or cfg[key] < 1:
                refuse(key, "must be a positive integer")
        for key in _MOE_FIELDS:
            if cfg.get(key):
                refuse(key, "mixture-of-experts checkpoints are not supported yet")
        if cfg.get("use_sliding_window") or any(t != "full_attention" for t in cfg.get("layer_types") or ()):
            key = "use_sliding_window" if cfg.get("use_sliding_window") else "layer_types"
            refuse(key, "sliding-window attention is not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", "only SiLU-gated MLPs (SwiGLU) are supported")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                refuse(key, "biases on these linears are not supported (Qwen2's q/k/v bias is)")
        rope = _rope(cfg)
        if rope.get("rope_type") not in SUPPORTED_ROPE_TYPES:
            raise HFCheckpointError(f"{where}: rope_type = {rope.get('rope_type')!r}: not supported "
                                    f"(supported: {list(SUPPORTED_ROPE_TYPES)})")
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise HFCheckpointError(f"{where}: partial_rotary_factor = {rope['partial_rotary_factor']!r}: "
                                    "only full-dimension RoPE is supported")
        heads = cfg["num_attention_heads"]
        groups = cfg.get("num_key_value_heads") or heads
        if heads % groups:
            refuse("num_key_value_heads", f"must divide num_attention_heads ({heads})")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        tp = tensor_parallel_size
        for key, value in (("num_attention_heads", heads), ("num_key_value_heads", groups),
                           ("intermediate_size", cfg["intermediate_size"]), ("vocab_size", cfg["vocab_size"])):
            if value % tp:
                raise HFCheckpointError(f"{where}: {key} = {value}: not divisible by the tensor-parallel "
                                        f"size {tp}")
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        if dtype not in DTYPES:
            refuse("dtype" if "dtype" in cfg else "torch_dtype", f"supported: {list(DTYPES)}")
        return cls(
            model_type=model_type, num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
            num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim,
            ffn_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            qkv_bias=model_type == "qwen2", qk_layernorm=model_type == "qwen3", dtype=dtype,
            init_std=float(cfg.get("initializer_range", 0.02)), raw=dict(cfg))

    @classmethod
    def from_dir(cls, path: str | os.PathLike, tensor_parallel_size: int = 1) -> "HFArch":
        where = os.path.join(os.fspath(path), "config.json")
        try:
            with open(where, encoding="utf-8") as f:
                cfg = json.load(f)
        except FileNotFoundError:
            raise HFCheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HFCheckpointError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise HFCheckpointError(f"{where}: not a JSON object")
        return cls.from_config(cfg, tensor_parallel_size, where)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _rope(cfg: dict) -> dict:
    """RoPE settings from either layout: transformers 5's ``rope_parameters`` or ``rope_theta`` + ``rope_scaling``."""
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    rope.update({k: v for k, v in scaling.items() if k not in rope})
    if "type" in rope and "rope_type" not in rope:   # the pre-4.45 spelling
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return rope
