"""precisionrt: dynamic per-layer FP8/BF16 precision for megatron-core training.

The public API (everything else is internal and may change):

* ``convert_layer_spec(spec, filter_fn=None, cpu_attention=False)``: a megatron-core layer spec with
  precisionrt's switchable linears (``precisionrt.layers.convert``).
* ``PrecisionRuntime(model, RuntimeConfig(...), run_dir=...)``: monitors, policy, switch log, operator control
  and checkpoint state around a model built from such a spec (``precisionrt.runtime.precision_runtime``).
* ``clip_grad_norm_(model, max_norm)``: gradient clipping by the whole model's norm under tensor (and pipeline)
  parallelism, counting each TP-duplicated parameter once (``precisionrt.distributed.clipping``).
* ``from_hf(path, spec=None, dtype=None, allow_nonfinite=False)`` / ``to_hf(model, out_dir)``: a Hugging Face
  checkpoint directory (Llama, Qwen2/2.5, Qwen3) as a megatron-core ``GPTModel`` with precisionrt's layers, and
  back, bit-exact (``precisionrt.models.hf``; needs the ``hf`` extra). ``from_hf`` checks the checkpoint against
  its config before a weight is used (``HFCheckpointError``); ``to_hf`` writes only a new, empty or earlier
  export directory of its own (``ExportRefused``).
* ``compile_model(model, regions="block" | "model", backend=...)``: ``torch.compile`` of such a model, per
  transformer block or whole, without a graph break in any precision mode (``precisionrt.distributed.compile``).
* ``RuntimeConfig`` and its parts ``ScalingConfig`` (the one place the scaling recipe is set), ``MonitorConfig``
  and ``PolicyConfig``.

Names are imported on first use, so ``import precisionrt`` (and the offline log tools, which need neither
torch nor megatron) stays light.
"""

from __future__ import annotations

import importlib

__all__ = ["convert_layer_spec", "PrecisionRuntime", "RuntimeConfig", "ScalingConfig", "MonitorConfig",
           "PolicyConfig", "clip_grad_norm_", "compile_model", "from_hf", "to_hf"]

_HOME = {"convert_layer_spec": "precisionrt.layers.convert", "PrecisionRuntime": "precisionrt.runtime.precision_runtime",
         "RuntimeConfig": "precisionrt.runtime.precision_runtime", "ScalingConfig": "precisionrt.numerics.fp8",
         "MonitorConfig": "precisionrt.runtime.monitors", "PolicyConfig": "precisionrt.runtime.policy",
         "clip_grad_norm_": "precisionrt.distributed.clipping", "compile_model": "precisionrt.distributed.compile", "from_hf": "precisionrt.models.hf", "to_hf": "precisionrt.models.hf"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'precisionrt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
