"""Under torchrun (2 gloo processes): with expert parallelism 2 (``ep``) or pipeline parallelism 2 (``pp``), the
runtime refuses the model, since both name their layers by local index. Prints one ``REFUSED <message>`` line
per rank; exits 1 if the runtime accepted."""

import sys

import torch

import precisionrt.mcore  # noqa: F401
from megatron.core import parallel_state

from precisionrt import PrecisionRuntime, RuntimeConfig
from precisionrt.megatron import ModelConfig, build_gpt


def main(kind: str) -> int:
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(**{f"{'expert' if kind == 'ep' else 'pipeline'}_model_parallel_size": 2})
    if kind == "ep":
        from test_moe import _moe_model   # the worker runs from tests/: its directory is on sys.path

        model = _moe_model(expert_model_parallel_size=2)
    else:
        model = build_gpt(ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128))
    try:
        PrecisionRuntime(model, RuntimeConfig(mode="dynamic"))
    except NotImplementedError as e:
        print(f"REFUSED {e}", flush=True)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
