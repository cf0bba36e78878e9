# Copyright (c) 2025, NVIDIA CORPORATION.  All rights reserved.

import argparse  # TEST: the options below
import os
import torch
from torch.optim import Adam
from torch.utils.data import DataLoader
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Tuple, Iterator

from megatron.core import parallel_state
from megatron.core import dist_checkpointing
from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.datasets.utils import compile_helpers
from megatron.core.datasets.blended_megatron_dataset_builder import (
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer as _NullTokenizer  # WHEEL: megatron.training is not in the megatron-core wheel
from megatron.core.distributed import DistributedDataParallel
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # FIX: see the optimizer below
from precisionrt import PrecisionRuntime, RuntimeConfig, clip_grad_norm_, convert_layer_spec  # PRECISIONRT
from precisionrt.distributed.pipeline import megatron_on_cpu  # CPU: megatron-core's CUDA calls, mapped to the CPU


_SEQUENCE_LENGTH: int = 64


def initialize_distributed(
    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1
) -> None:
    """
    Initialize torch.distributed and Megatron-Core model parallel groups.

    Args:
        tensor_model_parallel_size: Number of GPUs for tensor model parallelism.
        pipeline_model_parallel_size: Number of GPUs for pipeline model parallelism.
    """
    parallel_state.destroy_model_parallel()

    # Torch setup for distributed training
    rank: int = int(os.environ["RANK"])
    world_size: int = int(os.environ["WORLD_SIZE"])
    local_rank: int = int(os.environ["LOCAL_RANK"])

    if torch.cuda.is_available():  # CPU: no device to set, and gloo instead of nccl
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group(
        backend="nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world_size  # CPU
    )

    # Megatron core distributed training initialization
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size, pipeline_model_parallel_size
    )


def model_provider() -> GPTModel:
    """
    Build and return a simple GPT model for demonstration.

    Returns:
        GPTModel: A small GPT model with 2 layers for testing.
    """
    transformer_config: TransformerConfig = TransformerConfig(
        num_layers=2,
        hidden_size=16,  # PRECISIONRT: FP8 GEMMs need dimensions that are multiples of 16 (at 12 all stay BF16)
        num_attention_heads=4,
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),  # PP: each stage builds its share of the layers
    )

    gpt_model: GPTModel = GPTModel(
        config=transformer_config,
        transformer_layer_spec=convert_layer_spec(get_gpt_layer_local_spec(), cpu_attention=not torch.cuda.is_available()),  # PRECISIONRT (CPU: SDPA attention)
        vocab_size=100,
        max_sequence_length=_SEQUENCE_LENGTH,
        pre_process=parallel_state.is_pipeline_first_stage(),  # PP: each stage builds its own part (upstream runs PP=1)
        post_process=parallel_state.is_pipeline_last_stage(),  # PP
    )

    return gpt_model


def get_train_data_iterator() -> Iterator:
    """
    Create a mock dataset and return a data iterator.

    Returns:
        Iterator: Data iterator for training batches.
    """
    # WHEEL: compile_helpers() needs megatron's source tree (datasets/Makefile); the wheel ships the helpers built

    config: GPTDatasetConfig = GPTDatasetConfig(
        random_seed=0,
        sequence_length=_SEQUENCE_LENGTH,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        tokenizer=_NullTokenizer(vocab_size=_SEQUENCE_LENGTH),
        mid_level_dataset_surplus=0.005,
    )

    datasets = BlendedMegatronDatasetBuilder(
        MockGPTDataset, [1000, None, None], lambda: True, config
    ).build()

    train_dataloader: DataLoader = DataLoader(datasets[0], batch_size=8, shuffle=True)

    train_iterator: Iterator = iter(train_dataloader)

    return train_iterator


def forward_step_func(
    data_iterator: Iterator, model: torch.nn.Module
) -> Tuple[torch.Tensor, Callable]:
    """
    Forward step function that computes model output and returns loss function.

    Args:
        data_iterator: Iterator providing training batches.
        model: The GPT model to train.

    Returns:
        Tuple of (output_tensor, loss_function) where loss_function is a partial
        function that will compute the final loss when called.
    """

    def loss_func(
        loss_mask: torch.Tensor, output_tensor: torch.Tensor
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        losses: torch.Tensor = output_tensor.float()
        loss_mask = loss_mask.view(-1).float()
        loss: torch.Tensor = torch.sum(losses.view(-1) * loss_mask) / loss_mask.sum()
        # If you have data parallel reduce loss across data parallel groups.
        # If pipeline parallel, loss computation is done only in last stage.

        return loss, {"lm loss": loss}

    data: Dict[str, torch.Tensor] = next(data_iterator)
    tokens: torch.Tensor = data["tokens"].to(device)
    attention_mask: torch.Tensor = data["attention_mask"].to(device)
    position_ids: torch.Tensor = data["position_ids"].to(device)
    labels: torch.Tensor = data["labels"].to(device)
    loss_mask: torch.Tensor = data["loss_mask"].to(device)

    output_tensor: torch.Tensor = model(
        tokens, position_ids, attention_mask, labels=labels
    )

    return output_tensor, partial(loss_func, loss_mask)


def save_distributed_checkpoint(
    checkpoint_path: str, gpt_model: torch.nn.Module, rt: PrecisionRuntime  # PRECISIONRT
) -> None:
    """
    Save model checkpoint using Megatron-Core distributed checkpointing.

    Args:
        checkpoint_path: Directory path to save checkpoint.
        gpt_model: The model to checkpoint (may be wrapped with DDP).
    """
    # Access underlying model if wrapped with DDP
    model: torch.nn.Module = (
        gpt_model.module if hasattr(gpt_model, "module") else gpt_model
    )
    sharded_state_dict: Dict = model.sharded_state_dict(prefix="")
    sharded_state_dict["precision_runtime"] = rt.sharded_state_dict()  # PRECISIONRT: saved and resharded with the model
    dist_checkpointing.save(
        sharded_state_dict=sharded_state_dict, checkpoint_dir=checkpoint_path
    )


def load_distributed_checkpoint(
    checkpoint_path: str, gpt_model: torch.nn.Module, rt: PrecisionRuntime  # PRECISIONRT
) -> torch.nn.Module:
    """
    Load model checkpoint using Megatron-Core distributed checkpointing.

    Args:
        checkpoint_path: Directory path to load checkpoint from.
        gpt_model: The model to load into (may be wrapped with DDP).

    Returns:
        The model with loaded checkpoint weights.
    """
    # Access underlying model if wrapped with DDP
    model: torch.nn.Module = (
        gpt_model.module if hasattr(gpt_model, "module") else gpt_model
    )
    sharded_state_dict: Dict = model.sharded_state_dict(prefix="")
    sharded_state_dict["precision_runtime"] = rt.sharded_state_dict()  # PRECISIONRT
    checkpoint: Dict = dist_checkpointing.load(
        sharded_state_dict=sharded_state_dict, checkpoint_dir=checkpoint_path
    )
    rt.load_sharded_state_dict(checkpoint.pop("precision_runtime"))  # PRECISIONRT
    model.load_state_dict(checkpoint)
    return gpt_model


if __name__ == "__main__":
    parser = argparse.ArgumentParser()  # TEST: the layout, the run's files, a resume and a drill (tests/test_example_loop.py)
    parser.add_argument("--tp", type=int, default=2)  # TEST
    parser.add_argument("--pp", type=int, default=1)  # TEST
    parser.add_argument("--run-dir", default="runs/simple")  # TEST: the switch log's directory
    parser.add_argument("--ckpt", default=os.getcwd() + "/ckpt")  # TEST: where to save
    parser.add_argument("--resume-from", default=None)  # TEST: a checkpoint to continue (in this layout or another)
    parser.add_argument("--drill", action="store_true")  # TEST: NaN into layer 1's fc2 output gradient at step 3
    args = parser.parse_args()  # TEST
    initialize_distributed(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)  # TEST
    on_cpu = megatron_on_cpu(); on_cpu.__enter__()  # CPU: for the whole script (on a GPU it does nothing)
    if torch.cuda.is_available():  # CPU: the CUDA RNG tracker needs CUDA; CPU initialisation uses torch's RNG
        model_parallel_cuda_manual_seed(123)
    torch.manual_seed(123)  # CPU

    gpt_model: GPTModel = model_provider()
    device: torch.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU
    gpt_model.to(device)

    # Wrap model with DistributedDataParallel for proper gradient synchronization.
    # This provides the finish_grad_sync() method required by finalize_model_grads().
    config: TransformerConfig = gpt_model.config
    ddp_config: DistributedDataParallelConfig = DistributedDataParallelConfig(
        grad_reduce_in_fp32=False,
        overlap_grad_reduce=False,
        use_distributed_optimizer=False,
    )
    gpt_model = DistributedDataParallel(
        config=config,
        ddp_config=ddp_config,
        module=gpt_model,
    )

    rt = PrecisionRuntime(gpt_model, RuntimeConfig(mode="dynamic"), run_dir=args.run_dir)  # PRECISIONRT

    # FIX: upstream's torch Adam never steps: megatron's DDP leaves .grad None and the gradients in .main_grad
    optim = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.0), [gpt_model])  # FIX (clip_grad: precisionrt clips below)
    if args.resume_from:  # TEST: continue the run of a checkpoint
        load_distributed_checkpoint(checkpoint_path=args.resume_from, gpt_model=gpt_model, rt=rt)  # TEST
    if args.drill:  # TEST: a fault drill
        rt.drill(kind="nonfinite", layer="decoder.layers.1.mlp.linear_fc2", start_step=3)  # TEST

    train_iterator: Iterator = get_train_data_iterator()

    forward_backward_func: Callable[..., Dict[str, Any]] = get_forward_backward_func()

    # Running the model for 5 iterations
    for iteration in range(rt.last_step, rt.last_step + 5):  # PRECISIONRT: a resumed run continues its steps
        optim.zero_grad()
        gpt_model.zero_grad_buffer()  # FIX: DDP's main_grad buffers accumulate across iterations otherwise

        losses_reduced: Dict[str, Any] = forward_backward_func(
            forward_step_func=forward_step_func,
            data_iterator=train_iterator,
            model=gpt_model,
            num_microbatches=1,
            seq_length=_SEQUENCE_LENGTH,
            micro_batch_size=8,
            decoder_seq_length=_SEQUENCE_LENGTH,
            forward_only=False,
        )

        # Finalize model gradients: all-reduce across DP and TP groups.
        # This synchronizes gradients for non-tensor-parallel parameters (e.g., LayerNorm)
        # across tensor parallel ranks and all gradients across data parallel ranks.
        finalize_model_grads([gpt_model])

        grad_norm = clip_grad_norm_(gpt_model, 1.0)  # PRECISIONRT: the whole model's norm, of DDP's main_grad
        rt.optimizer_step(optim, grad_norm, iteration + 1)  # PRECISIONRT: optim.step() unless a gradient is NaN/Inf
        rt.end_step(iteration + 1)  # PRECISIONRT: monitors and policy; switches apply before the next forward

        print(f"Iteration {iteration}: Losses reduced: {losses_reduced}")

    # Saving the model
    ckpt_path: str = args.ckpt  # TEST
    Path(ckpt_path).mkdir(exist_ok=True)
    save_distributed_checkpoint(gpt_model=gpt_model, checkpoint_path=ckpt_path, rt=rt)  # PRECISIONRT

    # Loading the model
    gpt_model = load_distributed_checkpoint(
        gpt_model=gpt_model, checkpoint_path=ckpt_path, rt=rt  # PRECISIONRT
    )
    gpt_model.to(device)
    print("Successfully loaded the model")
    rt.close(rt.last_step)  # PRECISIONRT: run_end in the switch log
