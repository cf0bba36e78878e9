"""``to_hf``: a megatron-core ``GPTModel`` written back as a Hugging Face checkpoint that ``transformers``
loads. The export gathers each HF tensor along the dimension it was cut and rank 0 writes; a round trip with
``from_hf`` is bit-exact."""

from __future__ import annotations

import json
import os
import shutil

import torch

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from precisionrt.files import UnsafeFile, atomic_dir, inside, kind_of, open_regular, read_json, regular_file
from precisionrt.models.hf.arch import DTYPES, HFArch
from precisionrt.models.hf.names import INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES, hub_roots, name_map


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

    ``to_hf`` owns only what it wrote: ``out_dir`` must be new, empty, or an earlier export of its own (marked by
    ``MARKER``); anything else (a directory of other files, a file, a symlink, a mount point), or a tokenizer
    file that is not a regular file inside ``tokenizer_dir``, raises ``ExportRefused`` naming the path, before
    anything is written. Returns the path on rank 0, None elsewhere.
    """
    if tokenizer_dir is not None and not os.path.isdir(tokenizer_dir):
        raise ExportRefused(f"to_hf: tokenizer_dir {os.fspath(tokenizer_dir)!r} is not a directory")
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


class ExportRefused(ValueError):
    """``to_hf`` will not write here: the target is not a new or empty directory nor one of its own exports, or
    a tokenizer file to copy is not a regular file inside its directory. The message names the path; nothing
    was written or removed."""


MARKER = ".precisionrt-export.json"
"""The file every export carries: what wrote the directory and the files it wrote. ``to_hf`` replaces only a
directory holding this marker and nothing beyond the files it lists (as Megatron marks its checkpoints)."""
_WRITER = "precisionrt.to_hf"


def check_export_target(out_dir: str | os.PathLike) -> None:
    """Refuse (``ExportRefused``) a target ``to_hf`` does not own: it may write a new directory, fill an empty
    one, or replace an earlier export of its own (the marker, and no file the marker does not list). A regular
    file, a symlink, a mount point, a foreign or edited directory are refused by name, before anything is written."""
    out = os.fspath(out_dir)
    if os.path.islink(out):
        raise ExportRefused(f"to_hf: {out} is a symlink; export to a directory of its own")
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ExportRefused(f"to_hf: {out} exists and is {kind_of(os.stat(out).st_mode)}, not a directory; "
                            "it is not replaced")
    if os.path.ismount(out):
        raise ExportRefused(f"to_hf: {out} is a mount point; export into a new directory inside it")
    try:
        present = set(os.listdir(out))
    except OSError as e:
        raise ExportRefused(f"to_hf: {out} cannot be listed ({e.strerror})") from None
    if not present:
        return
    foreign = ExportRefused(f"to_hf: {out} holds files that are not a precisionrt export (e.g. "
                            f"{sorted(present)[:3]}) and is not replaced; choose a new directory or empty it")
    if MARKER not in present:
        raise foreign
    try:
        marker = read_json(os.path.join(out, MARKER), "an export marker", limit=1 << 20)
    except (OSError, ValueError) as e:
        raise ExportRefused(f"to_hf: {os.path.join(out, MARKER)} is not a readable export marker ({e}); "
                            f"{out} is not replaced") from None
    if not isinstance(marker, dict) or marker.get("written_by") != _WRITER or not isinstance(marker.get("files"), list):
        raise foreign
    extra = sorted(present - set(marker["files"]) - {MARKER})
    if extra:
        raise ExportRefused(f"to_hf: {out} is an earlier export, but holds files it did not write: {extra[:3]}; "
                            "it is not replaced (move them away, or export elsewhere)")


def tokenizer_sources(tokenizer_dir: str | os.PathLike) -> dict[str, str]:
    """The tokenizer files of ``tokenizer_dir`` an export copies (name -> path): regular files that resolve
    inside the directory (``hub_roots``: a hub snapshot's blobs too). A symlink out of it, a FIFO or a device is
    refused (``ExportRefused``) rather than copied into the export."""
    out = {}
    for name in TOKENIZER_FILES:
        src = os.path.join(os.fspath(tokenizer_dir), name)
        if not os.path.lexists(src):
            continue
        try:
            inside(tokenizer_dir, name, "the tokenizer file", hub_roots(tokenizer_dir))
            regular_file(src, "a tokenizer file")
        except (UnsafeFile, OSError) as e:
            raise ExportRefused(f"to_hf: {e}; it is not copied into the export") from None
        out[name] = src
    return out


def _write(arch: HFArch, tensors: dict, out_dir: str, tokenizer_dir, max_shard_bytes: int) -> str:
    from safetensors.torch import save_file

    check_export_target(out_dir)
    sources = tokenizer_sources(tokenizer_dir) if tokenizer_dir else {}
    try:
        with atomic_dir(out_dir) as tmp:
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
            for name, src in sources.items():
                with open_regular(src, "rb", "a tokenizer file") as fin, open(os.path.join(tmp, name), "wb") as fout:
                    shutil.copyfileobj(fin, fout)
            check_export_target(out_dir)   # still ours now that the new one is whole (nothing was added meanwhile)
            _write_json(os.path.join(tmp, MARKER), {"written_by": _WRITER, "version": 1,
                                                    "files": sorted(os.listdir(tmp))})
    except UnsafeFile as e:   # the target turned into something atomic_dir does not replace
        raise ExportRefused(f"to_hf: {e}") from None
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
