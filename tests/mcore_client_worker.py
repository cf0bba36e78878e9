"""A Megatron user's own loop, shaped like megatron-core's ``examples/run_simple_mcore_train_loop.py``, with
precisionrt embedded as docs/embedding.md says: megatron's local GPT spec converted, megatron's schedule
(``get_forward_backward_func``), precisionrt's clip, the runtime once per step, and ``dist_checkpointing``
save/load of the model's and the runtime's ``sharded_state_dict`` together. Run by tests/test_mcore_client.py:

    torchrun --nproc-per-node N tests/mcore_client_worker.py OUT TP PP PHASE

PHASE ``ddp``: 6 steps with megatron's DistributedDataParallel and optimizer instead of the plain loop.
PHASE ``first``: 8 steps uninterrupted (recorded), then the same run from scratch to step 4, saved to OUT/ckpt.
PHASE ``resume``: load OUT/ckpt (in this layout, or another: resharding) and train to step 8 (recorded).
A spike into layer 1's fc1 (stage 1 at PP=2) at step 3 is promoted at the check of step 3; one into layer 0's
fc1 at step 4 falls inside the window that the checkpoint of step 4 carries, and is promoted at the check of
step 6 only if the window was restored. Plain SGD (no optimizer state): the model and runtime are the state.
"""

import os
import sys
from functools import partial

import torch

import precisionrt.distributed.mcore  # noqa: F401
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.pipeline_parallel import get_forward_backward_func

from precisionrt import MonitorConfig, PolicyConfig, PrecisionRuntime, RuntimeConfig, ScalingConfig, clip_grad_norm_
from precisionrt import convert_layer_spec
from precisionrt.run.inject import FaultInjector, InjectConfig
from precisionrt.models.gpt import ModelConfig, transformer_config
from precisionrt.distributed.pipeline import megatron_on_cpu

SEQ, STEPS, SAVE_AT = 16, 8, 4
# step 3 (counted from 1), seen by the check of step 3; step 4, inside the window the checkpoint of step 4 carries
SPIKES = {"decoder.layers.1.mlp.linear_fc1": 2, "decoder.layers.0.mlp.linear_fc1": 3}


def model_provider(tp: int, pp: int) -> GPTModel:
    torch.manual_seed(0)
    config = transformer_config(ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                            seq_length=SEQ), tensor_parallel_size=tp, pipeline_parallel_size=pp)
    spec = convert_layer_spec(get_gpt_layer_local_spec(normalization="RMSNorm"), cpu_attention=True)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=256, max_sequence_length=SEQ,
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage())


def runtime_of(model) -> PrecisionRuntime:
    return PrecisionRuntime(model, RuntimeConfig(
        mode="dynamic", scaling=ScalingConfig(recipe="delayed", amax_history_len=4),
        monitor=MonitorConfig(check_interval=3, shadow_every=0), policy=PolicyConfig(overflow=0.05)))


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 256, (4, SEQ + 1), generator=torch.Generator().manual_seed(step))


def forward_step_func(data_iterator, model):
    def loss_func(loss_mask, output_tensor):
        losses = output_tensor.float()
        loss = torch.sum(losses.view(-1) * loss_mask.view(-1)) / loss_mask.sum()
        return loss, {"lm loss": loss.detach().clone()}

    tokens = next(data_iterator)
    positions = torch.arange(SEQ).expand(tokens.shape[0], SEQ)
    output = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
    return output, partial(loss_func, torch.ones(tokens.shape[0], SEQ))


def train(model, rt, optimizer, start: int, end: int) -> dict:
    injectors = [FaultInjector(InjectConfig(kind="spike", layer=layer, start_step=at, factor=1000.0), model,
                               names=rt.names) for layer, at in SPIKES.items()]
    losses, switches = [], []
    for step in range(start, end):
        for injector in injectors:
            injector.before_step(step)
        with megatron_on_cpu():
            out = get_forward_backward_func()(forward_step_func=forward_step_func,
                                              data_iterator=iter(list(batch(step).chunk(2))), model=model,
                                              num_microbatches=2, seq_length=SEQ, micro_batch_size=2,
                                              forward_only=False)
        clip_grad_norm_(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        switches += [e.summary() for e in rt.end_step(step + 1)]
        losses.append(torch.stack([o["lm loss"] for o in out]).mean().item() if out else None)
    return {"losses": losses, "switches": switches, "precisions": rt.precisions()}


def train_ddp(model, rt) -> dict:
    """Megatron's DistributedDataParallel and optimizer (Adam through ``get_megatron_optimizer``), as in megatron's
    own training loop. ``clip_grad=0``: megatron's clip asserts CUDA tensors (``optimizer/clip_grads.py:167``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    before = {n: layer.weight.detach().clone() for n, layer in rt.layers.items()}
    with megatron_on_cpu():   # DDP's grad buffers are allocated on torch.cuda.current_device()
        ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.0), [ddp])
    model.config.no_sync_func, model.config.finalize_model_grads_func = ddp.no_sync, finalize_model_grads
    injectors = [FaultInjector(InjectConfig(kind="spike", layer=layer, start_step=at, factor=1000.0), model,
                               names=rt.names) for layer, at in SPIKES.items()]
    switches, norms = [], []
    for step in range(6):
        for injector in injectors:
            injector.before_step(step)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        with megatron_on_cpu():
            get_forward_backward_func()(forward_step_func=forward_step_func,
                                        data_iterator=iter(list(batch(step).chunk(2))), model=[ddp],
                                        num_microbatches=2, seq_length=SEQ, micro_batch_size=2, forward_only=False)
            ok, grad_norm, _ = optimizer.step()
        norms.append(grad_norm)
        switches += [e.summary() for e in rt.end_step(step + 1)]
    moved = sorted(n for n, layer in rt.layers.items() if not torch.equal(layer.weight.detach(), before[n]))
    return {"switches": switches, "grad_norms": norms, "managed_weights_moved": moved, "managed": sorted(rt.layers)}


def state_of(model, rt) -> dict:
    return {"model": model.sharded_state_dict(prefix=""), "precision": rt.sharded_state_dict()}


def main(out: str, tp: int, pp: int, phase: str) -> None:
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    rank = torch.distributed.get_rank()
    model = model_provider(tp, pp)
    rt = runtime_of(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    if phase == "ddp":
        record = train_ddp(model, rt)
    elif phase == "first":
        record = train(model, rt, optimizer, 0, STEPS)
        model = model_provider(tp, pp)
        rt = runtime_of(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        train(model, rt, optimizer, 0, SAVE_AT)
        os.makedirs(f"{out}/ckpt", exist_ok=True)   # dist_checkpointing.save wants the directory to exist
        with megatron_on_cpu():
            dist_checkpointing.save(state_of(model, rt), f"{out}/ckpt")
    else:
        with megatron_on_cpu():
            loaded = dist_checkpointing.load(state_of(model, rt), f"{out}/ckpt")
        model.load_state_dict(loaded["model"], strict=False)   # the _extra_state entries of megatron's linears
        rt.load_sharded_state_dict(loaded["precision"])
        record = {"loaded_precisions": rt.precisions(), "loaded_gemms": rt.gemm_precisions(),
                  "loaded_scaling": {n: l.numerics.state_dict() for n, l in rt.layers.items()},
                  **train(model, rt, optimizer, SAVE_AT, STEPS)}
    torch.save(record, f"{out}/{phase}_tp{tp}_pp{pp}_rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
