"""How Hugging Face tensors make megatron parameters, and the files of an HF checkpoint.

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
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)

from precisionrt.models.hf.arch import HFArch


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def hub_roots(path) -> tuple[str, ...]:
    """Where else a checkpoint directory's files may resolve: a Hugging Face hub snapshot
    (``models--org--name/snapshots/<revision>/``) keeps its files as symlinks into the repository's ``blobs/``.
    Anything else a symlink points at is outside what the user named, and refused."""
    real = os.path.realpath(path)
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":
        return (os.path.join(os.path.dirname(parent), "blobs"),)
    return ()


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
