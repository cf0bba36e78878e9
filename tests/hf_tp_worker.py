"""Run by tests under torchrun (2 gloo ranks, TP=2): for each checkpoint directory given, import it with
``from_hf`` (each rank reading only its slices), compute logits on the shared test batch with the reference
spec (float32 GEMMs), gather them, and export the model back with ``to_hf``. Rank 0 saves, per checkpoint,
the logits and the number of tensor elements each rank read, to OUT_DIR/tp.pt; the exports go to
OUT_DIR/<name>-export."""

import os
import sys

import torch

from hf_models import batch

import precisionrt.models.hf as hf
import precisionrt.models.hf.load as hf_load
from precisionrt.models.hf.arch import HFArch
from precisionrt.distributed.parallel import init_parallel


def main(out_dir: str, checkpoints: list[str]) -> None:
    init_parallel(2)
    rank = torch.distributed.get_rank()
    read = {"elements": 0}
    original = hf_load._read_slice

    def counting(files, piece, r, tp):
        t = original(files, piece, r, tp)
        read["elements"] += t.numel()
        return t

    hf_load._read_slice = counting   # from_hf's own module: where it looks the name up
    results = {}
    ids, _, positions, mask = batch()
    for path in checkpoints:
        read["elements"] = 0
        model = hf.from_hf(path, hf.hf_layer_spec(HFArch.from_dir(path), precision=False)).eval()
        with torch.no_grad():
            logits = hf.gather_logits(model(ids, positions, mask))
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(2)]
        torch.distributed.all_gather(counts, torch.tensor([read["elements"]]))
        name = os.path.basename(path)
        hf.to_hf(model, os.path.join(out_dir, f"{name}-export"))
        results[name] = {"logits": logits, "elements_read": [int(c) for c in counts]}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "tp.pt"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
