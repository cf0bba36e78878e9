"""Megatron's own schedules (``get_forward_backward_func``) for precisionrt's training loop, on any device.

``forward_backward`` runs one step's micro-batches through megatron-core's schedule: ``forward_backward_no_pipelining``
without pipeline parallelism, 1F1B across stages with it. The last stage computes the loss; ``from_last_stage``
brings a last-stage value to every rank (one collective, at logging only).

megatron-core 0.16.1 assumes CUDA in these places on a Megatron user's CPU path (its schedule, DDP,
``dist_checkpointing``); ``megatron_on_cpu`` works around them while the call runs on a machine without CUDA (and
changes nothing where CUDA is present):

=========================================================  =========================================================
megatron-core 0.16.1                                       workaround
=========================================================  =========================================================
``schedules.py:596, 983, 2138``: ``total_num_tokens =      a ``TorchFunctionMode`` maps ``device="cuda"`` of factory
torch.zeros([], ..., device="cuda")``                      functions to the CPU
``p2p_communication.py:313, 321``: receive buffers on      ``torch.cuda.current_device`` answers ``"cpu"`` while the
``torch.cuda.current_device()``                            schedule runs
``p2p_communication.py:398``: ``torch.cuda.synchronize()`` a no-op while the schedule runs (the race it guards is
after batched send/receive                                 between CUDA streams; gloo has none); outside
                                                           ``megatron_on_cpu``, ``batch_p2p_sync=False``
``distributed/param_and_grad_buffer.py:783``: DDP's grad   ``torch.cuda.current_device`` answers ``"cpu"``
buffers on ``torch.cuda.current_device()``
``dist_checkpointing/strategies/filesystem_async.py:230``  ``torch.cuda.synchronize`` is a no-op while the call runs
``torch.cuda.synchronize()``; ``state_dict_saver.py:252``  (a CPU copy is complete when it returns); the device as
a flag on ``torch.cuda.current_device()``                  above
``optimizer/clip_grads.py:167`` asserts                    none: ``OptimizerConfig(clip_grad=0.0)`` (no clipping) on
``torch.cuda.FloatTensor`` gradients                       a CPU; megatron's ``clip_grad`` on a GPU
=========================================================  =========================================================

``dist_checkpointing.save`` also needs ``psutil`` (the ``dist-ckpt`` extra) and an existing directory, and spawns a
helper process: the script that calls it needs an ``if __name__ == "__main__"`` guard.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

__all__ = ["forward_backward", "from_last_stage", "megatron_on_cpu", "per_token_loss_step"]


class _CudaFactoriesOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def megatron_on_cpu():
    """While megatron's schedule runs without CUDA: its CUDA tensors are made on the CPU (see the module's table)."""
    if torch.cuda.is_available():
        yield
        return
    current_device, synchronize = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None   # the CPU's copies are complete when they return
    try:
        with _CudaFactoriesOnCpu():
            yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = current_device, synchronize


def per_token_loss_step(loss_of: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]):
    """A megatron ``forward_step_func`` over micro-batches of token tensors: ``loss_of(model, tokens)`` returns the
    model's output (per-token losses on the last stage, the hidden states elsewhere); the loss is their mean."""
    def forward_step(data_iterator, model):
        output = loss_of(model, next(data_iterator))

        def loss_func(per_token: torch.Tensor):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach().clone()}   # the schedule divides `loss` in place
        return output, loss_func
    return forward_step


def forward_backward(model: torch.nn.Module, forward_step, micro_batches: list[torch.Tensor], seq_length: int,
                     forward_only: bool = False) -> torch.Tensor | None:
    """Run ``micro_batches`` through megatron's schedule (backward too unless ``forward_only``); the mean loss
    over the micro-batches as a device tensor on the last pipeline stage, None on the others. Gradients
    accumulate in ``.grad`` as ``loss / len(micro_batches)`` of each, so they are the whole batch's mean."""
    with megatron_on_cpu():
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=model,
            num_microbatches=len(micro_batches), seq_length=seq_length,
            micro_batch_size=micro_batches[0].shape[0], forward_only=forward_only)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return torch.stack([o["loss"] for o in out]).mean()


def from_last_stage(value: torch.Tensor | None, device: torch.device) -> float:
    """A last-stage scalar (None elsewhere) on every rank: one all-reduce over the pipeline group (none
    without pipeline parallelism). A host synchronisation: for logging steps."""
    group = parallel_state.get_pipeline_model_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return float(value)
    total = torch.zeros((), dtype=torch.float64, device=device) if value is None else value.double().reshape(())
    torch.distributed.all_reduce(total, group=group)
    return float(total)
