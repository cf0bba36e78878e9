"""Megatron's process groups, as the runtime and clipping need them: a group only when it has more than one
rank (None otherwise, so one process never pays for a collective), and the layouts the runtime refuses."""

from __future__ import annotations

import torch


def megatron_group(kind: str):
    """Megatron's ``kind`` group (``"tensor_model_parallel"``, ``"pipeline_model_parallel"``, ``"model_parallel"``:
    TP x PP, ...) when torch.distributed and megatron's parallel state are up and it has more than one rank,
    else None."""
    from megatron.core import parallel_state

    if not (torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return None
    group = getattr(parallel_state, f"get_{kind}_group")()
    return group if torch.distributed.get_world_size(group) > 1 else None


def tensor_parallel_group():
    """Megatron's tensor-parallel group when it has more than one rank, else None."""
    return megatron_group("tensor_model_parallel")


def pipeline_group():
    """Megatron's pipeline group when it has more than one stage, else None."""
    return megatron_group("pipeline_model_parallel")


def check_parallelism() -> None:
    """Refuse expert parallelism: its layers are named and decided globally (``layout.py``), but megatron-core
    0.16's token dispatchers need CUDA, so no test has run an EP step through the runtime yet."""
    from megatron.core import parallel_state

    if not (torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return
    size = parallel_state.get_expert_model_parallel_world_size()
    if size > 1:
        raise NotImplementedError(
            f"PrecisionRuntime: expert_model_parallel_size {size} is not supported yet (untested: megatron's "
            "token dispatchers need CUDA); use expert size 1")
