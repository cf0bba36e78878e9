"""``from_hf``: a megatron-core ``GPTModel`` built from a local Hugging Face checkpoint directory (Llama,
Qwen2/Qwen2.5, Qwen3; fp32 or bf16; any tensor-parallel size that divides the heads). Each rank reads only its own
slices (safetensors' lazy ``get_slice``), never the whole checkpoint. Every model parameter must be named by the map
(``names.py``) and every mapped tensor must have the shape the config implies, or nothing is loaded."""

from __future__ import annotations

import json
import os

import torch

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from precisionrt.layers import rope
from precisionrt.layers.spec import precision_layer_spec
from precisionrt.models.hf.arch import DTYPES, HFArch, HFCheckpointError
from precisionrt.models.hf.names import INDEX_FILE, SINGLE_FILE, Piece, name_map
from precisionrt.models.transformer import megatron_transformer_config, place_model


def hf_layer_spec(arch: HFArch, scaling=None, precision: bool = True):
    """precisionrt's layer spec with what ``arch`` needs (Qwen3's q/k norms)."""
    return precision_layer_spec(scaling, qk_layernorm=arch.qk_layernorm, precision=precision)


def build_from_arch(arch: HFArch, spec=None, *, scaling=None, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> GPTModel:
    """A randomly initialised ``GPTModel`` of ``arch`` (the model ``from_hf`` then fills)."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call precisionrt.distributed.parallel.init_parallel(...) (or initialise megatron's parallel "
                           "state) before from_hf")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    dtype = _dtype(dtype, arch)
    config = megatron_transformer_config(
        device, num_layers=arch.num_layers, hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim, ffn_hidden_size=arch.ffn_hidden_size, normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_layernorm, init_method_std=arch.init_std,
        tensor_model_parallel_size=tp, params_dtype=dtype)
    model = GPTModel(config=config, transformer_layer_spec=spec or hf_layer_spec(arch, scaling),
                     vocab_size=arch.vocab_size, max_sequence_length=arch.max_position_embeddings,
                     position_embedding_type="rope",
                     share_embeddings_and_output_weights=arch.tie_word_embeddings)
    rope.install(model, rope.inverse_frequencies(arch.head_dim, arch.rope))
    model.hf_arch = arch
    return place_model(model, dtype, device)


def from_hf(path: str | os.PathLike, spec=None, *, scaling=None, dtype: str | torch.dtype | None = None,
            device: str | torch.device = "cpu") -> GPTModel:
    """A ``GPTModel`` holding the weights of the HF checkpoint directory ``path``.

    ``spec``: a transformer-layer spec (default: precisionrt's, with what the family needs); pass any spec
    through ``convert_layer_spec``. ``dtype``: ``"float32"`` or ``"bfloat16"`` (default: the checkpoint's).
    Call after megatron's parallel state is initialised; at tensor-parallel size > 1 each rank reads only
    its slices. Refuses (``HFCheckpointError``, naming the field or file) before reading any weight what it
    cannot represent exactly; a missing shard, missing tensor, wrong shape or truncated file loads nothing.
    The forward takes explicit ``position_ids`` (RoPE is applied at them).
    """
    path = os.fspath(path)
    tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    arch = HFArch.from_dir(path, tp)
    entries = name_map(arch, tp)
    files = _weight_files(path, [p.name for e in entries for p in e.pieces])
    model = build_from_arch(arch, spec, scaling=scaling, dtype=dtype, device=device)
    params = dict(model.named_parameters())
    expected = {e.param for e in entries}
    if set(params) != expected:
        raise HFCheckpointError(f"the layer spec builds parameters the {arch.model_type} name map does not "
                                f"cover: {sorted(set(params) ^ expected)[:6]}")
    rank = parallel_state.get_tensor_model_parallel_rank()
    loaded = {e.param: e.join([_read_slice(files, p, rank, tp) for p in e.pieces]) for e in entries}
    with torch.no_grad():
        for name, value in loaded.items():
            if params[name].shape != value.shape:
                raise HFCheckpointError(f"{name}: the checkpoint gives {tuple(value.shape)}, the model has "
                                        f"{tuple(params[name].shape)}")
            params[name].copy_(value)
    model.hf_source = path
    return model


def _dtype(dtype, arch: HFArch) -> torch.dtype:
    if dtype is None:
        return arch.torch_dtype
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r}: supported are {list(DTYPES)}")


def _weight_files(path: str, names: list[str]) -> dict[str, str]:
    """HF tensor name -> the safetensors file holding it; every file and name checked before any read."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HFCheckpointError(f"{index}: unreadable shard index ({e!r})") from None
        where = {n: os.path.join(path, f) for n, f in weight_map.items()}
    elif os.path.exists(os.path.join(path, SINGLE_FILE)):
        where = {n: os.path.join(path, SINGLE_FILE) for n in _tensor_names(os.path.join(path, SINGLE_FILE))}
    else:
        raise HFCheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints load)")
    missing = [n for n in names if n not in where]
    if missing:
        raise HFCheckpointError(f"{path}: {len(missing)} tensor(s) the model needs are not in the checkpoint, "
                                f"e.g. {missing[:3]}")
    for file in sorted({where[n] for n in names}):
        if not os.path.exists(file):
            raise HFCheckpointError(f"{file}: shard listed in {INDEX_FILE} is missing")
        _tensor_names(file)   # opens the header: a truncated or foreign file fails here, before any copy
    return {n: where[n] for n in names}


def _tensor_names(file: str) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except Exception as e:   # safetensors raises its own SafetensorError, not an OSError
        raise HFCheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _read_slice(files: dict[str, str], piece: Piece, rank: int, tp: int) -> torch.Tensor:
    from safetensors import safe_open

    try:
        with safe_open(files[piece.name], framework="pt") as f:
            sl = f.get_slice(piece.name)
            shape = tuple(sl.get_shape())
            if shape != piece.shape:
                raise HFCheckpointError(f"{files[piece.name]}: {piece.name} has shape {shape}, the config "
                                        f"implies {piece.shape}")
            if piece.tp_dim is None:
                return sl[:]
            n = shape[piece.tp_dim] // tp
            index = [slice(None)] * len(shape)
            index[piece.tp_dim] = slice(rank * n, (rank + 1) * n)
            return sl[tuple(index)]
    except HFCheckpointError:
        raise
    except Exception as e:
        raise HFCheckpointError(f"{files[piece.name]}: reading {piece.name} failed ({e})") from None
