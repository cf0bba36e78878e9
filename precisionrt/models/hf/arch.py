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

import math
import os
from dataclasses import dataclass, field

import torch

from precisionrt.files import read_json_or
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
        """The architecture ``cfg`` asks for, every field precisionrt reads checked for its type and range first
        (the bounds of the ``[model]`` table's own keys): an integer is an integer (not a bool or a string), a
        dimension is positive, an epsilon or a RoPE base positive and finite, a switch a real boolean."""
        if not isinstance(cfg, dict):
            raise HFCheckpointError(f"{where}: not a JSON object")
        check = _Fields(cfg, where)
        model_type = check.str("model_type")
        if model_type not in FAMILIES:
            check.refuse("model_type", f"not a family precisionrt imports (supported: {list(FAMILIES)})")
        hidden = check.int("hidden_size", 1, 2**17)
        layers = check.int("num_hidden_layers", 1, 1024)
        heads = check.int("num_attention_heads", 1, 1024)
        ffn = check.int("intermediate_size", 1, 2**20)
        vocab = check.int("vocab_size", 1, 2**22)
        groups = check.int("num_key_value_heads", 1, 1024, default=None) or heads
        for key in _MOE_FIELDS:
            if cfg.get(key) not in (None, 0, False):
                check.refuse(key, "mixture-of-experts checkpoints are not supported yet")
        if check.bool("use_sliding_window", False):
            check.refuse("use_sliding_window", "sliding-window attention is not supported")
        layer_types = cfg.get("layer_types")
        if layer_types is not None:
            if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
                check.refuse("layer_types", "must be a list of strings")
            if any(t != "full_attention" for t in layer_types):
                check.refuse("layer_types", "sliding-window attention is not supported")
        if check.str("hidden_act", "silu") != "silu":
            check.refuse("hidden_act", "only SiLU-gated MLPs (SwiGLU) are supported")
        for key in ("attention_bias", "mlp_bias"):
            if check.bool(key, False):
                check.refuse(key, "biases on these linears are not supported (Qwen2's q/k/v bias is)")
        rope = _rope(cfg, where)
        if heads % groups:
            check.refuse("num_key_value_heads", f"must divide num_attention_heads ({heads})")
        if cfg.get("head_dim") is None and hidden % heads:
            check.refuse("num_attention_heads", f"must divide hidden_size ({hidden}) when head_dim is not given")
        head_dim = check.int("head_dim", 1, 2**14, default=None) or hidden // heads
        if head_dim % 2:
            raise HFCheckpointError(f"{where}: head_dim = {head_dim}: RoPE rotates pairs of channels, so it must "
                                    "be even")
        tp = tensor_parallel_size
        for key, value in (("num_attention_heads", heads), ("num_key_value_heads", groups),
                           ("intermediate_size", ffn), ("vocab_size", vocab)):
            if value % tp:
                raise HFCheckpointError(f"{where}: {key} = {value}: not divisible by the tensor-parallel "
                                        f"size {tp}")
        dtype_key = "dtype" if cfg.get("dtype") is not None else "torch_dtype"
        dtype = check.str(dtype_key, "float32")
        if dtype not in DTYPES:
            check.refuse(dtype_key, f"supported: {list(DTYPES)}")
        return cls(
            model_type=model_type, num_layers=layers, hidden_size=hidden,
            num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim,
            ffn_hidden_size=ffn, vocab_size=vocab,
            norm_eps=check.float("rms_norm_eps", 0, 1, default=1e-6), rope=rope,
            tie_word_embeddings=check.bool("tie_word_embeddings", False),
            max_position_embeddings=check.int("max_position_embeddings", 1, 2**24, default=4096),
            qkv_bias=model_type == "qwen2", qk_layernorm=model_type == "qwen3", dtype=dtype,
            init_std=check.float("initializer_range", 0, 10, default=0.02), raw=dict(cfg))

    @classmethod
    def from_dir(cls, path: str | os.PathLike, tensor_parallel_size: int = 1) -> "HFArch":
        where = os.path.join(os.fspath(path), "config.json")
        if not os.path.isdir(path):
            raise HFCheckpointError(f"{os.fspath(path)}: not a directory (a Hugging Face checkpoint is one)")
        try:
            cfg = read_json_or(HFCheckpointError, where, "a checkpoint's config.json", limit=_CONFIG_LIMIT)
        except FileNotFoundError:
            raise HFCheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)") from None
        if not isinstance(cfg, dict):
            raise HFCheckpointError(f"{where}: not a JSON object")
        return cls.from_config(cfg, tensor_parallel_size, where)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


_CONFIG_LIMIT = 16 << 20
"""A config.json is a few KiB; one larger than this is not read."""
_NO_DEFAULT = object()


class _Fields:
    """Typed reads of a config's fields, each refusal naming the field and its value."""

    def __init__(self, cfg: dict, where: str):
        self.cfg, self.where = cfg, where

    def refuse(self, key: str, why: str, value=_NO_DEFAULT):
        shown = self.cfg.get(key) if value is _NO_DEFAULT else value
        raise HFCheckpointError(f"{self.where}: {key} = {_short(shown)}: {why}")

    def _get(self, key, default):
        value = self.cfg.get(key)
        if value is None:
            if default is _NO_DEFAULT:
                self.refuse(key, "missing")
            return default, True
        return value, False

    def int(self, key: str, lo: int, hi: int, default=_NO_DEFAULT):
        value, defaulted = self._get(key, default)
        if defaulted:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.refuse(key, f"must be an integer in [{lo}, {hi}]")
        if not lo <= value <= hi:
            self.refuse(key, f"out of range [{lo}, {hi}]")
        return value

    def float(self, key: str, gt: float, le: float, default=_NO_DEFAULT, value=_NO_DEFAULT):
        if value is _NO_DEFAULT:
            value, defaulted = self._get(key, default)
            if defaulted:
                return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.refuse(key, f"must be a number in ({gt:g}, {le:g}]", value)
        if not math.isfinite(value) or not gt < value <= le:
            self.refuse(key, f"must be finite and in ({gt:g}, {le:g}]", value)
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value, defaulted = self._get(key, default)
        if not isinstance(value, bool):   # "false" would read as true
            self.refuse(key, "must be true or false (a JSON boolean)")
        return value

    def str(self, key: str, default=_NO_DEFAULT) -> str:
        value, defaulted = self._get(key, default)
        if not isinstance(value, str):
            self.refuse(key, "must be a string")
        return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _rope(cfg: dict, where: str = "config.json") -> dict:
    """RoPE settings from either layout: transformers 5's ``rope_parameters`` or ``rope_theta`` + ``rope_scaling``,
    every parameter the rope type uses checked."""
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise HFCheckpointError(f"{where}: {key} = {_short(cfg[key])}: must be a JSON object")
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    rope.update({k: v for k, v in scaling.items() if k not in rope})
    if "type" in rope and "rope_type" not in rope:   # the pre-4.45 spelling
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    check = _Fields(rope, where)
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        check.refuse("rope_type", f"not supported (supported: {list(SUPPORTED_ROPE_TYPES)})")
    rope["rope_theta"] = check.float("rope_theta", 0, 1e12)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        check.refuse("partial_rotary_factor", "only full-dimension RoPE is supported")
    if rope["rope_type"] in ("linear", "llama3"):
        rope["factor"] = check.float("factor", 0, 1e6)
    if rope["rope_type"] == "llama3":
        low, high = check.float("low_freq_factor", 0, 1e6), check.float("high_freq_factor", 0, 1e6)
        if high <= low:
            check.refuse("high_freq_factor", f"must exceed low_freq_factor ({low:g}): llama3 RoPE interpolates "
                         "between them")
        check.int("original_max_position_embeddings", 1, 2**24)
    return rope
