"""Run by tests under torchrun: one forward/backward of the small GPT at the launcher's world size as TP,
saving loss and full (gathered) gradients to OUT_DIR/tp{N}_{precision}.pt from rank 0."""

import sys

import torch

from conftest import SMALL
from precisionrt.layers.linear import precision_layers
from precisionrt.models.gpt import build_gpt
from precisionrt.distributed.parallel import init_parallel
from precisionrt.distributed.clipping import clip_grad_norm_
from precisionrt.train import lm_loss


def gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def main(out_dir: str, precision: str) -> None:
    from megatron.core import parallel_state

    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    init_parallel(world)
    group = parallel_state.get_tensor_model_parallel_group()
    torch.manual_seed(0)
    model = build_gpt(SMALL, tensor_parallel_size=world)
    for layer in precision_layers(model).values():
        layer.precision = precision
    tokens = torch.randint(0, 256, (4, SMALL.seq_length + 1), generator=torch.Generator().manual_seed(0))
    loss = lm_loss(model, tokens)
    loss.backward()
    # the model's gradient norm as the training loop clips by it (no clipping at this max_norm)
    norm = clip_grad_norm_(model, 1e9, group)
    result = {"loss": loss.detach(), "grad_norm": norm.detach()}
    for name, p in model.named_parameters():
        if "layernorm" in name or "position_embeddings" in name:
            result[name] = p.grad
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):  # row-parallel: split along dim 1
            result[name] = gather(p.grad, 1, group)
    if torch.distributed.get_rank() == 0:
        torch.save(result, f"{out_dir}/tp{world}_{precision}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
