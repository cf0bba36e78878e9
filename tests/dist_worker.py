"""Run by tests under torchrun: precisionrt.train on every rank, each rank dumping what it decided.

    torchrun --nproc-per-node 2 tests/dist_worker.py OUT_DIR key=value ...
"""

import json
import sys

import torch

from precisionrt.config import load_config
from precisionrt.train import LMConfig, train


def main(out_dir: str, overrides: list[str]) -> None:
    cfg = load_config(LMConfig, None, overrides)
    summary = train(cfg)
    rank = torch.distributed.get_rank()
    with open(f"{out_dir}/rank{rank}.json", "w") as fh:
        json.dump({"switches": summary["switches"], "precisions": summary["precisions"],
                   "skipped_steps": summary["skipped_steps"], "final_train_loss": summary["final_train_loss"]}, fh)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
