"""Hugging Face checkpoints in and out: ``from_hf`` builds a megatron-core ``GPTModel`` from a local HF
directory (Llama, Qwen2/Qwen2.5, Qwen3; fp32 or bf16; any tensor-parallel size that divides the heads), and
``to_hf`` writes one back that ``transformers`` loads. A round trip is bit-exact.

The name map
------------
Every megatron parameter is made of one or more HF tensors, each cut along one dimension across the tensor-
parallel ranks (or replicated), and joined on the rank:

* ``linear_qkv``: megatron keeps, per query group, that group's query heads, then its key head, then its value
  head (``[groups, (heads/groups + 2) * head_dim, hidden]``); HF keeps ``q_proj``, ``k_proj``, ``v_proj``
  apart. A rank holds whole groups, so it cuts q, k and v by rows and interleaves locally. Biases likewise.
* ``linear_fc1``: ``[gate; up]`` of the rank's rows (SwiGLU's two halves).
* ``linear_proj`` / ``linear_fc2``: cut by columns (row-parallel). Embedding and output head: by rows (the
  vocabulary). Norms (q/k norms included): replicated.

Each rank reads only its own slices (safetensors' lazy ``get_slice``), never the whole checkpoint; the
export gathers each HF tensor along the same dimension and rank 0 writes. Every model parameter must be named
by the map and every mapped tensor must have the shape the config implies, or nothing is loaded.

Why written here, not taken from a bridge (tried on Python 3.11, torch 2.13 CPU, megatron-core 0.16.1,
transformers 5.24): mbridge 0.15.1 needs Transformer Engine and CUDA as shipped, silently drops Llama 3's
rope scaling under transformers 5 (its ``"rope_scaling" in config`` test is false: logits off by 0.22, no
error), and a tied Qwen load mutates a name map its bridges share, so a later untied model exports its
embedding as the head. Megatron-Bridge 0.4+ needs Python 3.12; 0.3.1 needs Transformer Engine and fails to
build mamba-ssm. Megatron's own RoPE needs CUDA and ignores position ids: ``precisionrt.rope`` replaces it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch

import precisionrt.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from precisionrt import rope
from precisionrt.hf_arch import DTYPES, HFArch, HFCheckpointError
from precisionrt.megatron import megatron_transformer_config, place_model, precision_layer_spec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Piece:
    """One HF tensor and the dimension it is cut along across tensor-parallel ranks (None: replicated)."""

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None


@dataclass(frozen=True)
class Entry:
    """A megatron parameter, the HF pieces it is made of, and how the rank's slices join (and split back)."""

    param: str
    pieces: tuple[Piece, ...]
    join: Callable[[list[torch.Tensor]], torch.Tensor]
    split: Callable[[torch.Tensor], list[torch.Tensor]]


def name_map(arch: HFArch, tp: int) -> list[Entry]:
    """The entries of a model of ``arch`` at tensor-parallel size ``tp`` (the same list on every rank)."""
    h, d, heads, groups = arch.hidden_size, arch.head_dim, arch.num_attention_heads, arch.num_key_value_heads
    one = (lambda parts: parts[0]), (lambda t: [t])

    def entry(param, *pieces, ops=one):
        return Entry(param, tuple(Piece(*p) for p in pieces), *ops)

    entries = [entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight", (arch.vocab_size, h), 0))]
    qkv = _qkv_ops(heads // groups, d, groups // tp)
    gate_up = (lambda p: torch.cat(p, 0)), (lambda t: list(t.chunk(2, 0)))
    for i in range(arch.num_layers):
        m, a = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, kv = (heads * d,), (groups * d,)
        entries += [
            entry(m + "input_layernorm.weight", (a + "input_layernorm.weight", (h,), None)),
            entry(m + "self_attention.linear_qkv.weight", (a + "self_attn.q_proj.weight", q + (h,), 0),
                  (a + "self_attn.k_proj.weight", kv + (h,), 0), (a + "self_attn.v_proj.weight", kv + (h,), 0),
                  ops=qkv),
            entry(m + "self_attention.linear_proj.weight", (a + "self_attn.o_proj.weight", (h, heads * d), 1)),
            entry(m + "pre_mlp_layernorm.weight", (a + "post_attention_layernorm.weight", (h,), None)),
            entry(m + "mlp.linear_fc1.weight", (a + "mlp.gate_proj.weight", (arch.ffn_hidden_size, h), 0),
                  (a + "mlp.up_proj.weight", (arch.ffn_hidden_size, h), 0), ops=gate_up),
            entry(m + "mlp.linear_fc2.weight", (a + "mlp.down_proj.weight", (h, arch.ffn_hidden_size), 1)),
        ]
        if arch.qkv_bias:
            entries.append(entry(m + "self_attention.linear_qkv.bias", (a + "self_attn.q_proj.bias", q, 0),
                                 (a + "self_attn.k_proj.bias", kv, 0), (a + "self_attn.v_proj.bias", kv, 0),
                                 ops=qkv))
        if arch.qk_layernorm:
            entries += [entry(m + "self_attention.q_layernorm.weight", (a + "self_attn.q_norm.weight", (d,), None)),
                        entry(m + "self_attention.k_layernorm.weight", (a + "self_attn.k_norm.weight", (d,), None))]
    entries.append(entry("decoder.final_layernorm.weight", ("model.norm.weight", (h,), None)))
    if not arch.tie_word_embeddings:
        entries.append(entry("output_layer.weight", ("lm_head.weight", (arch.vocab_size, h), 0)))
    return entries


def _qkv_ops(heads_per_group: int, head_dim: int, local_groups: int):
    """Join q, k, v row slices into megatron's per-group layout, and split it back."""
    sizes = [heads_per_group * head_dim, head_dim, head_dim]

    def join(parts):
        q, k, v = (p.reshape(local_groups, n, *p.shape[1:]) for p, n in zip(parts, sizes))
        return torch.cat((q, k, v), dim=1).reshape(-1, *parts[0].shape[1:])

    def split(t):
        grouped = t.reshape(local_groups, sum(sizes), *t.shape[1:])
        return [p.reshape(-1, *t.shape[1:]) for p in grouped.split(sizes, dim=1)]

    return join, split


def hf_layer_spec(arch: HFArch, scaling=None, precision: bool = True):
    """precisionrt's layer spec with what ``arch`` needs (Qwen3's q/k norms)."""
    return precision_layer_spec(scaling, qk_layernorm=arch.qk_layernorm, precision=precision)


def build_from_arch(arch: HFArch, spec=None, *, scaling=None, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> GPTModel:
    """A randomly initialised ``GPTModel`` of ``arch`` (the model ``from_hf`` then fills)."""
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call precisionrt.megatron.init_parallel(...) (or initialise megatron's parallel "
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
    index = os.path.join(path, _INDEX)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HFCheckpointError(f"{index}: unreadable shard index ({e!r})") from None
        where = {n: os.path.join(path, f) for n, f in weight_map.items()}
    elif os.path.exists(os.path.join(path, _SINGLE)):
        where = {n: os.path.join(path, _SINGLE) for n in _tensor_names(os.path.join(path, _SINGLE))}
    else:
        raise HFCheckpointError(f"{path}: neither {_SINGLE} nor {_INDEX} (only safetensors checkpoints load)")
    missing = [n for n in names if n not in where]
    if missing:
        raise HFCheckpointError(f"{path}: {len(missing)} tensor(s) the model needs are not in the checkpoint, "
                                f"e.g. {missing[:3]}")
    for file in sorted({where[n] for n in names}):
        if not os.path.exists(file):
            raise HFCheckpointError(f"{file}: shard listed in {_INDEX} is missing")
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


def hf_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights under HF names, whole (gathered across tensor-parallel ranks), on the CPU."""
    arch: HFArch = model.hf_arch
    tp = parallel_state.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    out = {}
    for e in name_map(arch, tp):
        for piece, local in zip(e.pieces, e.split(params[e.param].detach())):
            out[piece.name] = _gather(local.contiguous(), piece.tp_dim, tp).cpu().contiguous()
    return out


def _gather(t: torch.Tensor, dim: int | None, tp: int) -> torch.Tensor:
    if dim is None or tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    torch.distributed.all_gather(parts, t, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def to_hf(model: GPTModel, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
          max_shard_bytes: int = 5 * 2**30, dtype: str | None = None) -> str | None:
    """Write ``model`` (built by ``from_hf`` or ``build_from_arch``) as an HF checkpoint directory.

    Every tensor-parallel rank must call it (the weights are gathered); rank 0 writes config.json, the
    safetensors shards (an index when there are several) and the tokenizer files of ``tokenizer_dir``
    (default: the directory the model came from). The write is atomic: a temporary directory beside
    ``out_dir``, renamed into place; an existing ``out_dir`` is replaced only once the new one is whole.
    Returns the path on rank 0, None elsewhere.
    """
    if tokenizer_dir is not None and not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"to_hf: tokenizer_dir {os.fspath(tokenizer_dir)!r} is not a directory")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"to_hf: dtype {dtype!r}: supported are {list(DTYPES)} (None: the model's)")
    tensors = hf_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
        return None
    try:
        return _write(model.hf_arch, tensors, os.fspath(out_dir), tokenizer_dir or getattr(model, "hf_source", None),
                      max_shard_bytes)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


def _write(arch: HFArch, tensors: dict, out_dir: str, tokenizer_dir, max_shard_bytes: int) -> str:
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        shards = _shard(tensors, max_shard_bytes)
        names = ([_SINGLE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, shard in zip(names, shards):
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            _write_json(os.path.join(tmp, _INDEX), index)
        config = dict(arch.raw)
        config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
        _write_json(os.path.join(tmp, "config.json"), config)
        for name in TOKENIZER_FILES if tokenizer_dir else ():
            src = os.path.join(os.fspath(tokenizer_dir), name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
        if os.path.exists(out_dir):   # replace only now that the new directory is whole
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.replace(out_dir, os.path.join(old, "model"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _shard(tensors: dict, max_bytes: int) -> list[dict]:
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits ``[..., vocab / tp]`` -> whole ``[..., vocab]`` (``parallel_output=False`` asserts
    CUDA in megatron-core 0.16, so gather here)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return _gather(logits.contiguous(), logits.dim() - 1, tp)
