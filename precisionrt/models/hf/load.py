"""``from_hf``: a megatron-core ``GPTModel`` built from a local Hugging Face checkpoint directory (Llama,
Qwen2/Qwen2.5, Qwen3; fp32 or bf16; any tensor-parallel size that divides the heads). Each rank reads only its own
slices (safetensors' lazy ``get_slice``), never the whole checkpoint. Every model parameter must be named by the map
(``names.py``) and every mapped tensor must have the shape the config implies, or nothing is loaded."""

from __future__ import annotations

import math
import os
import re

import torch

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from precisionrt.distributed.memory import GIB, available_memory
from precisionrt.files import UnsafeFile, inside, read_json, regular_file
from precisionrt.layers import rope
from precisionrt.layers.spec import precision_layer_spec
from precisionrt.models.hf.arch import DTYPES, HFArch, HFCheckpointError
from precisionrt.models.hf.names import INDEX_FILE, SINGLE_FILE, Piece, hub_roots, name_map
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
            device: str | torch.device = "cpu", allow_nonfinite: bool = False) -> GPTModel:
    """A ``GPTModel`` holding the weights of the HF checkpoint directory ``path``.

    ``spec``: a transformer-layer spec (default: precisionrt's, with what the family needs); pass any spec
    through ``convert_layer_spec``. ``dtype``: ``"float32"`` or ``"bfloat16"`` (default: the checkpoint's).
    Call after megatron's parallel state is initialised; at tensor-parallel size > 1 each rank reads only
    its slices. The forward takes explicit ``position_ids`` (RoPE is applied at them).

    The checkpoint is checked against its config before a weight is used, and anything wrong raises
    ``HFCheckpointError`` naming the file and the field or tensor: every config field read is type- and
    range-checked; every file read is a regular file, and every shard the index names resolves inside
    ``path`` (symlinks followed; a hub snapshot's ``blobs/`` too); every tensor the model needs is there with
    the shape the config implies and a floating-point dtype; every tensor in the checkpoint is used (extra
    tensors, extra layers, Qwen3's q/k norms under another ``model_type`` are named); the model's weights fit
    the memory ``device`` has; and no weight is NaN or infinite, unless ``allow_nonfinite``.
    """
    path = os.fspath(path)
    tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    arch = HFArch.from_dir(path, tp)
    entries = name_map(arch, tp)
    files = _weight_files(path, arch, [p for e in entries for p in e.pieces])
    _check_memory(path, arch, _dtype(dtype, arch), tp, torch.device(device))
    model = build_from_arch(arch, spec, scaling=scaling, dtype=dtype, device=device)
    params = dict(model.named_parameters())
    expected = {e.param for e in entries}
    if set(params) != expected:
        raise HFCheckpointError(f"the layer spec builds parameters the {arch.model_type} name map does not "
                                f"cover: {sorted(set(params) ^ expected)[:6]}")
    rank = parallel_state.get_tensor_model_parallel_rank()
    loaded, refusal = {}, None
    for e in entries:
        slices = [_read_slice(files, p, rank, tp) for p in e.pieces]
        for piece, t in zip(e.pieces, slices):
            if refusal is None and not allow_nonfinite and not bool(torch.isfinite(t).all()):
                refusal = (f"{files[piece.name]}: {piece.name} holds {int((~torch.isfinite(t)).sum())} non-finite "
                           "value(s) (NaN or infinity): training on it gives NaN; pass allow_nonfinite=True to "
                           "load it anyway")
        loaded[e.param] = e.join(slices)
    # each rank sees only its slices: all refuse together, or a rank that loaded would wait for one that refused
    if _any_rank(refusal is not None, tp):
        raise HFCheckpointError(refusal or f"{path}: another tensor-parallel rank found non-finite weights in its "
                                "slices; pass allow_nonfinite=True to load them anyway")
    with torch.no_grad():
        for name, value in loaded.items():
            if params[name].shape != value.shape:
                raise HFCheckpointError(f"{name}: the checkpoint gives {tuple(value.shape)}, the model has "
                                        f"{tuple(params[name].shape)}")
            params[name].copy_(value)
    model.hf_source = path
    return model


def _any_rank(flag: bool, tp: int) -> bool:
    if tp == 1:
        return flag
    group = parallel_state.get_tensor_model_parallel_group()
    device = "cuda" if torch.distributed.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(t.item())


def _check_memory(path: str, arch: HFArch, dtype: torch.dtype, tp: int, device: torch.device) -> None:
    """Refuse a model whose weights alone exceed the memory ``device`` has, before anything is allocated (as
    the commands' ``precisionrt.run.resources`` estimate refuses a run)."""
    elements = sum(math.prod(p.shape) // (tp if p.tp_dim is not None else 1)
                   for e in name_map(arch, tp) for p in e.pieces)
    need = elements * torch.empty((), dtype=dtype).element_size()
    have = available_memory(device.type)
    if have is not None and need > have:
        raise HFCheckpointError(f"{path}: the model's weights take {need / GIB:,.1f} GiB ({elements:,} values in "
                                f"{str(dtype).removeprefix('torch.')}), more than the {have / GIB:,.1f} GiB "
                                f"available on {device.type}")


def _dtype(dtype, arch: HFArch) -> torch.dtype:
    if dtype is None:
        return arch.torch_dtype
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r}: supported are {list(DTYPES)}")


_FLOATING = {"F32", "BF16", "F16", "F64"}
"""The safetensors dtypes a weight may be stored in (copied into the model's dtype); an integer or boolean dtype
over weight data is a damaged or forged header."""
_DERIVED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
"""Buffers old checkpoints store that precisionrt derives from the config (RoPE's frequencies): not weights."""


def _weight_files(path: str, arch: HFArch, pieces: list[Piece]) -> dict[str, str]:
    """HF tensor name -> the safetensors file holding it. Every file and every tensor header is checked before
    any weight is read: the files are regular files inside ``path``, every piece is held with its shape and a
    floating dtype, and every tensor held is one the model uses."""
    roots = hub_roots(path)
    index = os.path.join(path, INDEX_FILE)
    if os.path.lexists(index):
        weight_map = _read_index(path, index)
        where = {n: _shard_path(path, f, roots, f"shard listed in {INDEX_FILE}") for n, f in weight_map.items()}
    elif os.path.lexists(os.path.join(path, SINGLE_FILE)):
        single = _shard_path(path, SINGLE_FILE, roots, "the weights file")
        where = {}
    else:
        raise HFCheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints load)")
    headers = {}   # file -> {tensor name: (shape, dtype)}
    for file in sorted(set(where.values())) if where else [single]:
        if not os.path.exists(file):
            raise HFCheckpointError(f"{file}: shard listed in {INDEX_FILE} is missing")
        headers[file] = _header(file)
    if not where:
        where = {n: single for n in headers[single]}
    for name, file in where.items():
        if name not in headers[file]:
            raise HFCheckpointError(f"{index}: names {os.path.basename(file)} for {name}, which that file does not hold")
    held = {n: file for file, tensors in headers.items() for n in tensors}   # a shard's tensors the index omits too
    missing = [p.name for p in pieces if p.name not in where]
    if missing:
        raise HFCheckpointError(f"{path}: {len(missing)} tensor(s) the model needs are not in the checkpoint, "
                                f"e.g. {missing[:3]}")
    for p in pieces:
        shape, dtype = headers[where[p.name]][p.name]
        if shape != p.shape:
            raise HFCheckpointError(f"{where[p.name]}: {p.name} has shape {shape}, the config implies {p.shape}")
        if dtype not in _FLOATING:
            raise HFCheckpointError(f"{where[p.name]}: {p.name} is stored as {dtype}; a weight is floating point "
                                    f"({sorted(_FLOATING)})")
    _check_all_used(path, arch, set(held) - {p.name for p in pieces} - {n for n in held if _DERIVED.match(n)},
                    {**held, **where})
    return {p.name: where[p.name] for p in pieces}


def _read_index(path: str, index: str) -> dict[str, str]:
    try:
        data = read_json(index, "a shard index", limit=256 << 20)
    except UnsafeFile as e:
        raise HFCheckpointError(str(e)) from None
    except (OSError, ValueError) as e:
        raise HFCheckpointError(f"{index}: unreadable shard index ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise HFCheckpointError(f"{index}: weight_map = {type(weight_map).__name__}: must be a JSON object of "
                                "tensor name -> shard file")
    bad = [(n, f) for n, f in weight_map.items() if not isinstance(f, str)]
    if bad:
        raise HFCheckpointError(f"{index}: weight_map[{bad[0][0]!r}] = {bad[0][1]!r}: must be a shard file name")
    return weight_map


def _shard_path(path: str, name: str, roots: tuple[str, ...], what: str) -> str:
    """``path/name``, refused unless it is a safetensors file inside ``path`` (symlinks resolved) and a regular
    file: an index naming ``../x`` or ``/x`` never reads there, and a FIFO never blocks the load."""
    if not isinstance(name, str) or not name.endswith(".safetensors"):
        raise HFCheckpointError(f"{path}: {what} is {name!r}; only .safetensors files load (never pickles)")
    try:
        full = inside(path, name, what, roots)
        regular_file(full, what)
    except UnsafeFile as e:
        raise HFCheckpointError(str(e)) from None
    except FileNotFoundError:
        raise HFCheckpointError(f"{os.path.join(path, name)}: {what} is missing") from None
    except OSError as e:
        raise HFCheckpointError(f"{os.path.join(path, name)}: {what} cannot be read ({e.strerror or e})") from None
    return full


def _check_all_used(path: str, arch: HFArch, unused: set[str], where: dict[str, str]) -> None:
    """Refuse a checkpoint holding tensors the model does not use, naming them and, where it shows, why: the
    config describes fewer layers than the weights hold, or another family (Qwen3's q/k norms, Qwen2's
    q/k/v biases). A tied model may carry a copy of its embedding as ``lm_head.weight``."""
    if arch.tie_word_embeddings and "lm_head.weight" in unused:
        from safetensors import safe_open

        with safe_open(where["lm_head.weight"], framework="pt") as f:
            head = f.get_tensor("lm_head.weight")
        with safe_open(where["model.embed_tokens.weight"], framework="pt") as f:
            embedding = f.get_tensor("model.embed_tokens.weight")
        if head.shape != embedding.shape or not torch.equal(head, embedding):
            raise HFCheckpointError(f"{where['lm_head.weight']}: lm_head.weight differs from model.embed_tokens"
                                    ".weight, but tie_word_embeddings is true (the head would be dropped)")
        unused.discard("lm_head.weight")
    if not unused:
        return
    why = []
    layers = {int(m.group(1)) for n in unused if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    if layers and max(layers) >= arch.num_layers:
        why.append(f"the weights hold {max(layers) + 1} layers, num_hidden_layers says {arch.num_layers}")
    if not arch.qk_layernorm and any(n.endswith(("q_norm.weight", "k_norm.weight")) for n in unused):
        why.append(f"q/k norms are Qwen3's, model_type says {arch.model_type!r}")
    if not arch.qkv_bias and any(n.endswith("_proj.bias") for n in unused):
        why.append(f"q/k/v biases are Qwen2's, model_type says {arch.model_type!r}")
    names = sorted(unused)
    raise HFCheckpointError(f"{path}: {len(names)} tensor(s) in the checkpoint are not used by the "
                            f"{arch.model_type} model its config.json describes (it would load without them), "
                            f"e.g. {names[:3]}{'; ' + '; '.join(why) if why else ''}")


def _header(file: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor of a safetensors file with its shape and dtype, from the header alone."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
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
