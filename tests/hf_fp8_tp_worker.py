"""Run by ``tests/test_hf_fp8.py`` under torchrun (2 gloo ranks, TP=2): import an FP8 export with ``from_hf``
(each rank reading its slices of the FP8 weights and the whole scales) and export it again in FP8 with the map it
came with, to OUT_DIR (every rank gathers, rank 0 quantizes the whole tensors and writes)."""

import sys

import torch

import precisionrt.models.hf as hf
from precisionrt.distributed.parallel import init_parallel


def main(export: str, out_dir: str) -> None:
    init_parallel(2)
    model = hf.from_hf(export, dtype="float32")
    hf.to_hf(model, out_dir, quantization="fp8", precisions=model.hf_precisions)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
