"""Under torchrun (2 gloo processes) at expert parallelism 2: each rank's experts carry their global indices
(rank 1 holds experts 2-3 and names them so), and the runtime refuses the model all the same, since no EP step
can run here to test it (megatron's token dispatchers need CUDA). Prints ``EXPERTS <json>`` and one
``REFUSED <message>`` line per rank; exits 1 if the runtime accepted."""

import json
import sys

import torch

import precisionrt.distributed.mcore  # noqa: F401
from megatron.core import parallel_state

from precisionrt import PrecisionRuntime, RuntimeConfig
from precisionrt.layers.linear import precision_layers


def main() -> int:
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    from test_moe import _moe_model   # the worker runs from tests/: its directory is on sys.path

    model = _moe_model(expert_model_parallel_size=2)
    experts = sorted({n.split(".local_experts.")[1].split(".")[0] for n in precision_layers(model)
                      if ".local_experts." in n})
    print(f"EXPERTS {json.dumps([torch.distributed.get_rank(), experts])}", flush=True)
    try:
        PrecisionRuntime(model, RuntimeConfig(mode="dynamic"))
    except NotImplementedError as e:
        print(f"REFUSED {e}", flush=True)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
