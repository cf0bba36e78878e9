"""Bringing up a process: the device a run asks for (``run.device``), torch.distributed and Megatron's
parallel state."""

from __future__ import annotations

import os
import socket

import torch

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core import parallel_state

from precisionrt.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """``run.device``: ``auto`` is CUDA when a GPU is visible, else CPU. Under torchrun each rank takes the
    GPU of its ``LOCAL_RANK``. Asking for ``cuda`` without a GPU is an error that says so."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"run.device: {name!r} is not one of ['auto', 'cpu', 'cuda']")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' was asked for but torch sees no CUDA device "
                          f"(torch {torch.__version__}); use run.device=\"cpu\" or \"auto\"")
    index = int(os.environ.get("LOCAL_RANK", 0))
    if index >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {index} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _free_localhost_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(tensor_parallel_size: int = 1, seed: int = 0, device: str | torch.device = "cpu",
                  pipeline_parallel_size: int = 1) -> None:
    """Bring up torch.distributed (gloo for ``device`` CPU, nccl for CUDA) and Megatron's parallel state.

    Under ``torchrun`` the launcher's rendezvous is used; a plain process becomes a world of one bound to
    localhost. Idempotent for the same tensor- and pipeline-parallel sizes.
    """
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            torch.distributed.init_process_group(backend=backend)
        else:
            torch.distributed.init_process_group(
                backend=backend, init_method=f"tcp://127.0.0.1:{_free_localhost_port()}", rank=0, world_size=1
            )
    world = torch.distributed.get_world_size()
    if world % (tensor_parallel_size * pipeline_parallel_size):
        raise ValueError(f"world size {world} is not divisible by tensor_model_parallel_size {tensor_parallel_size} "
                         f"x pipeline_model_parallel_size {pipeline_parallel_size}")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size()) != (tensor_parallel_size,
                                                                            pipeline_parallel_size):
            parallel_state.destroy_model_parallel()
        else:
            return
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size,
                                             pipeline_model_parallel_size=pipeline_parallel_size)
    if torch.device(device).type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
