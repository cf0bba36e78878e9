"""Megatron's DistributedDataParallel and optimizer (``get_megatron_optimizer``) around a converted model, in the
one way docs/embedding.md documents: after the schedule (which calls ``finalize_model_grads``),
``precisionrt.clip_grad_norm_(ddp, max_norm)`` reads DDP's ``main_grad`` and ``rt.optimizer_step`` decides the skip
before megatron's ``step()``. Run by tests/test_megatron_ddp.py:

    torchrun --nproc-per-node N tests/mcore_ddp_worker.py OUT CONFIG...

CONFIG: ``plain``, ``overlap``, ``distopt`` or ``overlap+distopt``.

Every rank is a data-parallel replica (DP = N). For each DDP configuration 4 steps (the runtime built on the DDP
wrapper under ``overlap_grad_reduce``, on the model inside otherwise: the same names); at step 3 a NaN enters the output gradient of layer 1's fc2 on the
last rank only (``rt.drill(..., ranks=[N - 1])``). Recorded per step: precisionrt's norm, megatron's own norm of the
same gradients (``optimizer.get_grad_norm()`` after ``prepare_grads``, before the clip), the norm megatron's
``step()`` sees after the clip, and whether the step was skipped; then the switches and whether every parameter is
finite and equal across replicas.

Megatron's distributed optimizer checks ``Tensor.type()`` names for CUDA (``optimizer.py:671``,
``distrib_optimizer.py:361``); ``CudaTypeNames`` lets CPU tensors answer with the CUDA names while it is built and
steps. A test-only shim: on a GPU nothing of it is needed.
"""

import contextlib
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

import precisionrt.distributed.mcore  # noqa: F401
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from precisionrt import MonitorConfig, PrecisionRuntime, RuntimeConfig, clip_grad_norm_, convert_layer_spec
from precisionrt.distributed.pipeline import megatron_on_cpu
from precisionrt.models.gpt import ModelConfig, transformer_config

SEQ, STEPS, NAN_AT, MAX_NORM = 16, 4, 3, 0.5
NAN_LAYER = "decoder.layers.1.mlp.linear_fc2"


class CudaTypeNames(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str) \
                and out.startswith("torch.") and not out.startswith("torch.cuda."):
            return "torch.cuda." + out[len("torch."):]
        return out


@contextlib.contextmanager
def on_cpu(distopt: bool):
    with megatron_on_cpu(), (CudaTypeNames() if distopt and not torch.cuda.is_available() else
                             contextlib.nullcontext()):
        yield


def forward_step_func(data_iterator, model):
    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"loss": loss.detach().clone()}

    tokens = next(data_iterator)
    positions = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
    return model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]), loss_func


def run(overlap: bool, distopt: bool, wrap_runtime: bool) -> dict:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    config = transformer_config(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                                            seq_length=SEQ, vocab_size=64))
    spec = convert_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"), cpu_attention=True)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=SEQ)
    with on_cpu(distopt):   # DDP's grad buffers are allocated on torch.cuda.current_device()
        ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
            overlap_grad_reduce=overlap, use_distributed_optimizer=distopt, bucket_size=2000 if overlap else None))
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.0,
                                                           use_distributed_optimizer=distopt), [ddp])
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads   # the schedule finalizes, as megatron's training
    rt = PrecisionRuntime(ddp if wrap_runtime else model, RuntimeConfig(
        mode="dynamic", monitor=MonitorConfig(check_interval=100, shadow_every=0)))
    rt.drill(kind="nonfinite", layer=NAN_LAYER, start_step=NAN_AT, ranks=[world - 1])
    record = {"ours": [], "megatron": [], "after_clip": [], "skipped": [], "switches": []}
    for step in range(1, STEPS + 1):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        tokens = torch.randint(0, 64, (4, SEQ + 1), generator=torch.Generator().manual_seed(100 * step + rank))
        with on_cpu(distopt):
            get_forward_backward_func()(forward_step_func=forward_step_func, data_iterator=iter(list(tokens.chunk(2))),
                                        model=[ddp], num_microbatches=2, seq_length=SEQ, micro_batch_size=2)
            optimizer.prepare_grads()
            record["megatron"].append(float(optimizer.get_grad_norm()))
        grad_norm = clip_grad_norm_(ddp, MAX_NORM)
        record["ours"].append(float(grad_norm))
        with on_cpu(distopt):
            optimizer.prepare_grads()
            record["after_clip"].append(float(optimizer.get_grad_norm()))
            record["skipped"].append(rt.optimizer_step(optimizer, grad_norm, step))
        record["switches"] += [(e.step, e.layer, e.gemm, e.to, e.reason) for e in rt.end_step(step)]
    params = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    gathered = [torch.zeros_like(params) for _ in range(world)]
    torch.distributed.all_gather(gathered, params)
    record["finite"] = bool(torch.isfinite(params).all())
    record["replicas_equal"] = all(torch.equal(g, params) for g in gathered)
    record["names"] = sorted(rt.layers)
    # the model inside: megatron's distributed optimizer keeps the shards in the wrapper only
    try:
        clip_grad_norm_(model, MAX_NORM)
        record["inner_error"] = None
    except ValueError as e:
        record["inner_error"] = str(e)
    return record


def main(out: str, configs: list[str]) -> None:
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel()
    records = {}
    for overlap, distopt in [("overlap" in c, "distopt" in c) for c in configs]:
        records[f"overlap={overlap},distopt={distopt}"] = run(overlap, distopt, wrap_runtime=overlap)
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel()
    torch.save(records, os.path.join(out, f"ddp_world{torch.distributed.get_world_size()}"
                                          f"_rank{torch.distributed.get_rank()}.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
