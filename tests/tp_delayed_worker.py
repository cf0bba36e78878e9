"""Run by tests under torchrun: a few fp8 training steps of the small GPT at TP=2 with delayed scaling; rank 0
saves every scaling state's scale on every rank to OUT_DIR/delayed_{mode}.pt. mode "reduced": as the runtime
sets it up; "local": amax reduction turned off (each rank scales its own shard: the defect)."""

import sys

import torch

from conftest import SMALL
from precisionrt.numerics.fp8 import ScalingConfig
from precisionrt.models.gpt import build_gpt
from precisionrt.distributed.parallel import init_parallel
from precisionrt.runtime.precision_runtime import PrecisionRuntime, RuntimeConfig
from precisionrt.train import lm_loss


def main(out_dir: str, mode: str) -> None:
    init_parallel(2)
    torch.manual_seed(0)
    model = build_gpt(SMALL, tensor_parallel_size=2)
    rt = PrecisionRuntime(model, RuntimeConfig(mode="fp8", scaling=ScalingConfig(recipe="delayed",
                                                                                 amax_history_len=4)))
    if mode == "local":
        for layer in rt.layers.values():
            for state in layer.numerics.scaling.values():
                state.defer = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 5):
        lm_loss(model, torch.randint(0, 256, (4, SMALL.seq_length + 1), generator=g)).backward()
        opt.step()
        opt.zero_grad()
        rt.end_step(step)
    scales = {}
    for name, layer in rt.layers.items():
        for role, state in layer.numerics.scaling.items():
            parts = [torch.empty_like(state.scale) for _ in range(2)]
            torch.distributed.all_gather(parts, state.scale.contiguous())
            scales[f"{name}.{role}"] = torch.stack(parts)
    if torch.distributed.get_rank() == 0:
        torch.save(scales, f"{out_dir}/delayed_{mode}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
