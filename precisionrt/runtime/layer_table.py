"""The whole model's managed layers, as every rank sees them, under any parallel layout.

A rank holds only some layers: its pipeline stage's (and, under virtual pipelining, its chunks'), its experts'
under expert parallelism, and a shard of each under tensor parallelism. Decisions are nonetheless made for the
whole model on every rank alike: each rank contributes its layers' statistics as rows of one global
``[layers, columns]`` buffer (zero rows for the layers it does not hold), one MAX all-reduce over the world
fills every row from the ranks that hold it (TP shards and DP/CP replicas agree by taking the worst case), and
every rank then runs the same deterministic policy over the same rows. So a stage never decides for another
stage's layers with its own statistics, rank 0 knows every decision and writes the one switch log, and a
fault in stage 1's fc1 moves stage 1's fc1 only.

``LayerTable`` is the host-side list of all layers, gathered once at start (``all_gather_object``): name,
FLOPs per token of one shard, FP8 capability, and the order the forward pass runs them in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


_DECODER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# Within a transformer layer the attention's GEMMs run first, the QKV projection before the output projection
# (megatron registers linear_proj first, so module order is not forward order); the MLP's follow in module order.
_ATTENTION_ORDER = ("linear_qkv", "linear_proj")


@dataclass(frozen=True)
class LayerInfo:
    name: str
    gemm_flops_per_token: int
    """Forward + dgrad + wgrad FLOPs per token of one tensor-parallel shard."""
    fp8_unsupported: str | None
    order: tuple
    """Forward order: (global transformer layer index, attention projection rank, position within the layer on
    its rank, name)."""
    shape: tuple[int, int] = (0, 0)
    """(in_features, out_features) of one tensor-parallel shard: the GEMMs' K and N (the speed plan's key)."""

    @property
    def fp8_capable(self) -> bool:
        return self.fp8_unsupported is None


def local_infos(layers: dict) -> list[LayerInfo]:
    """This rank's layers (``precision_layers``: global name -> module) as table rows."""
    position: dict[int, int] = {}
    out = []
    for name, layer in layers.items():
        match = _DECODER_INDEX.search(name)
        block = int(match.group(1)) if match else -1
        position[block] = position.get(block, -1) + 1
        last = name.rsplit(".", 1)[-1]
        attention = _ATTENTION_ORDER.index(last) if last in _ATTENTION_ORDER else len(_ATTENTION_ORDER)
        out.append(LayerInfo(name, layer.gemm_flops_per_token, layer.fp8_unsupported_reason,
                             (block, attention, position[block], name), tuple(layer.weight.shape[::-1])))
    return out


class LayerTable:
    """Every managed layer of the model, in forward order, identical on every rank."""

    def __init__(self, infos: list[LayerInfo]):
        self.infos = sorted(infos, key=lambda i: i.order)
        self.names = [i.name for i in self.infos]
        self.by_name = {i.name: i for i in self.infos}
        self.row = {n: r for r, n in enumerate(self.names)}

    @classmethod
    def gather(cls, layers: dict) -> "LayerTable":
        """The union of every rank's layers (one ``all_gather_object`` at start; none in a world of one). The
        same name from two ranks must describe the same layer: a mismatch means two layers were given one
        name, and is an error rather than a silent merge."""
        mine = local_infos(layers)
        if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return cls(mine)
        every: list[list[LayerInfo]] = [None] * torch.distributed.get_world_size()   # type: ignore[list-item]
        torch.distributed.all_gather_object(every, mine)
        merged: dict[str, LayerInfo] = {}
        for rank, infos in enumerate(every):
            for info in infos:
                seen = merged.setdefault(info.name, info)
                if (seen.gemm_flops_per_token, seen.fp8_unsupported) != (info.gemm_flops_per_token,
                                                                         info.fp8_unsupported):
                    raise ValueError(f"rank {rank} describes layer {info.name!r} differently from another rank "
                                     f"({info} vs {seen}): the global layer names collide")
        return cls(list(merged.values()))

    def __len__(self) -> int:
        return len(self.infos)

    def rows_of(self, names: list[str], device: torch.device) -> torch.Tensor:
        """The global row indices of ``names`` (a device index tensor, made once)."""
        return torch.tensor([self.row[n] for n in names], dtype=torch.long, device=device)
