"""Run by tests/test_pipeline.py under torchrun (2 processes): pipeline parallelism against one stage.

    torchrun --nproc-per-node 2 tests/pp_worker.py OUT_DIR

1. The same weights, the same batches, a few AdamW steps in static FP8 through megatron's schedule: once with the
   whole model on every rank (PP=1), once split in two stages (PP=2, the stages loaded from the PP=1 weights by
   global layer index). Each rank writes the losses and the final weights of the layers it held in both runs.
2. Virtual pipelining (PP=2 x 2 model chunks per rank): each rank writes the runtime's global layer names.
"""

import sys

import torch

import precisionrt.distributed.mcore  # noqa: F401
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from precisionrt.distributed.clipping import clip_grad_norm_
from precisionrt.layers.linear import precision_layers
from precisionrt.models.gpt import ModelConfig, build_gpt, transformer_config
from precisionrt.distributed.parallel import init_parallel
from precisionrt.layers.spec import precision_layer_spec
from precisionrt.distributed.pipeline import forward_backward, from_last_stage
from precisionrt.runtime.precision_runtime import PrecisionRuntime, RuntimeConfig
from precisionrt.train import LM_STEP

CFG = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=16)
STEPS, MICRO = 3, 2


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, CFG.vocab_size, (4, CFG.seq_length + 1), generator=g) for _ in range(STEPS)]


def train(model) -> list[float]:
    runtime = PrecisionRuntime(model, RuntimeConfig(mode="fp8"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step, batch in enumerate(batches(), start=1):
        loss = forward_backward(model, LM_STEP, list(batch.chunk(MICRO)), CFG.seq_length)
        clip_grad_norm_(model, 1e6)   # reduced over the stages; a coefficient of exactly 1
        opt.step()
        opt.zero_grad(set_to_none=True)
        runtime.end_step(step)
        losses.append(from_last_stage(loss, torch.device("cpu")))
    return losses


def global_state(model) -> dict[str, torch.Tensor]:
    """The model's parameters by global name (decoder layer indices made global)."""
    offset = model.decoder.layers[0].layer_number - 1
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if key.startswith("decoder.layers."):
            parts[2] = str(int(parts[2]) + offset)
        if "_extra_state" not in key:
            out[".".join(parts)] = value.detach().clone()
    return out


def main(out_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    init_parallel(1)
    torch.manual_seed(0)
    whole = build_gpt(CFG)
    initial = global_state(whole)
    ref_losses = train(whole)
    ref = global_state(whole)

    parallel_state.destroy_model_parallel()
    init_parallel(1, pipeline_parallel_size=2)
    stage = build_gpt(CFG)
    offset = stage.decoder.layers[0].layer_number - 1
    local = {}
    for key in stage.state_dict():
        if "_extra_state" in key:
            continue
        parts = key.split(".")
        if key.startswith("decoder.layers."):
            parts[2] = str(int(parts[2]) + offset)
        local[key] = initial[".".join(parts)]
    stage.load_state_dict(local, strict=False)
    pp_losses = train(stage)
    got = global_state(stage)
    torch.save({"ref_losses": ref_losses, "pp_losses": pp_losses, "ref": {k: ref[k] for k in got}, "pp": got},
               f"{out_dir}/pp_rank{rank}.pt")

    # virtual pipelining: two chunks per rank, layers 0,2 on rank 0 and 1,3 on rank 1
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    config = transformer_config(CFG, pipeline_parallel_size=2)
    config.virtual_pipeline_model_parallel_size = 2
    chunks = [GPTModel(config=config, transformer_layer_spec=precision_layer_spec(), vocab_size=CFG.vocab_size,
                       max_sequence_length=CFG.seq_length, share_embeddings_and_output_weights=False,
                       pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v),
                       post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v),
                       vp_stage=v) for v in range(2)]
    runtime = PrecisionRuntime(chunks, RuntimeConfig(mode="fp8"))
    torch.save({"local": list(precision_layers(chunks)), "names": runtime.names}, f"{out_dir}/vpp_rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
