"""Mixture-of-experts layers on any device.

megatron-core 0.16.1's router gating fails without Transformer Engine, on any device, in two ways:

* ``TopKRouter.gating`` moves the router's weight (and bias) to the current CUDA device on first use
  (``moe/router.py``: ``self.weight.data = self.weight.data.to(torch.cuda.current_device())``): no MoE model
  runs on a CPU;
* its ``router_gating_linear`` tests ``te_general_gemm is not None``, a name that is only defined when
  Transformer Engine imports (``moe/moe_utils.py``): without TE every forward raises ``NameError``.

``install`` gives every router of a built model the gating megatron computes in its non-TE branch, where the
weight is: ``input @ weight.T (+ bias)`` in ``moe_router_dtype`` (default: the input's dtype), with autograd's
own backward (megatron's custom function only saves memory by not keeping the upcast copies).

The experts themselves are what precisionrt converts: ``SequentialMLP`` builds one MLP per local expert from
the (converted) ``linear_fc1`` / ``linear_fc2`` specs, so each expert's linears are layers of their own
(``decoder.layers.<l>.mlp.experts.local_experts.<i>.linear_fc1``), monitored and switched one by one.
``GroupedMLP`` is refused by ``convert_layer_spec``.
"""

from __future__ import annotations

import types

import torch

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core.transformer.moe.router import Router

_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def _gating(self, input: torch.Tensor) -> torch.Tensor:
    """``TopKRouter.gating`` without moving the weight: logits in ``moe_router_dtype`` (default: the input's)."""
    dtype = _DTYPES.get(self.config.moe_router_dtype, input.dtype)
    bias = None if self.bias is None else self.bias.to(dtype)
    return torch.nn.functional.linear(input.to(dtype), self.weight.to(dtype), bias)


def install(model: torch.nn.Module) -> int:
    """Give every megatron router in ``model`` the device-preserving gating; returns how many there are."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for router in routers:
        router.gating = types.MethodType(_gating, router)
    return len(routers)
