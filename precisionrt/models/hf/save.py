"""``to_hf``: a megatron-core ``GPTModel`` written back as a Hugging Face checkpoint that ``transformers``
loads. The export gathers each HF tensor along the dimension it was cut and rank 0 writes; a round trip with
``from_hf`` is bit-exact."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from precisionrt.models.hf.arch import DTYPES, HFArch
from precisionrt.models.hf.names import INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES, name_map


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
        names = ([SINGLE_FILE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, shard in zip(names, shards):
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            _write_json(os.path.join(tmp, INDEX_FILE), index)
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
