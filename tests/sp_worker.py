"""Run by tests under torchrun (2 gloo processes): one column-parallel PrecisionLinearFunction with sequence
parallelism. Each rank holds a sequence shard of the input and an output-row shard of the weight; forward
all-gathers the input, backward reduce-scatters the input gradient. Rank 0 saves every rank's results, beside
the float64 references computed from the full tensors, to OUT_DIR/sp_{precision}.pt.

    torchrun --nproc-per-node 2 tests/sp_worker.py OUT_DIR fp8|bf16
"""

import sys

import torch

from precisionrt.numerics.fp8 import ScalingConfig
from precisionrt.layers.linear import LayerNumerics, PrecisionLinearFunction

SEQ, BATCH, IN, OUT = 32, 2, 64, 64


def main(out_dir: str, precision: str) -> None:
    torch.distributed.init_process_group("gloo")
    group = torch.distributed.group.WORLD
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    x = torch.randn(SEQ, BATCH, IN, generator=gen)
    w = torch.randn(OUT, IN, generator=gen) * 0.05
    g = torch.randn(SEQ, BATCH, OUT, generator=gen) * 1e-3
    s, o = SEQ // world, OUT // world
    x_local = x[rank * s:(rank + 1) * s].clone().requires_grad_(True)   # sequence shard
    w_local = w[rank * o:(rank + 1) * o].clone().requires_grad_(True)   # output rows of a column-parallel layer
    numerics = LayerNumerics(ScalingConfig(), "cpu")
    y = PrecisionLinearFunction.apply(x_local, w_local, None, numerics, precision, False, True, group)
    y.backward(g[..., rank * o:(rank + 1) * o])
    ours = {"y": y.detach(), "dx": x_local.grad, "dw": w_local.grad}
    xd, wd, gd = x.double(), w.double(), g.double()
    ref = {"y": (xd @ wd.t())[..., rank * o:(rank + 1) * o],             # every token, this rank's outputs
           "dx": (gd @ wd)[rank * s:(rank + 1) * s],                     # summed over ranks, this rank's tokens
           "dw": torch.einsum("sbo,sbi->oi", gd, xd)[rank * o:(rank + 1) * o]}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, {"ours": ours, "ref": ref})
    if rank == 0:
        torch.save(gathered, f"{out_dir}/sp_{precision}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
