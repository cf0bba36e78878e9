"""Gradient clipping by the norm of the whole model, as Megatron computes it under model parallelism.

``torch.nn.utils.clip_grad_norm_`` sees only this rank's parameters. Under tensor parallelism each rank holds a
shard of every linear weight, so its norm is not the model's, the ranks clip by different coefficients, and
the parameters every TP rank holds a copy of (norms, biases of row-parallel layers, position embeddings) drift
apart: 1.15e-3 after a few steps in megatron's own example loop. Megatron's optimizer (``clip_grad``) avoids it
by counting each parameter once: a TP-duplicated parameter only on TP rank 0 (``tensor_model_parallel``
attribute, ``param_is_not_tensor_parallel_duplicate``), then one all-reduce of the squared norm over the
model-parallel group (TP x PP), so every rank gets the same norm and clips alike.
"""

from __future__ import annotations

import torch

from precisionrt.distributed.groups import megatron_group


def clip_grad_norm_(model: torch.nn.Module, max_norm: float, group=None) -> torch.Tensor:
    """Scale the gradients of ``model`` so that the norm of the whole model's gradient is at most
    ``max_norm``; returns that norm as a device tensor (no host synchronisation).

    ``group``: the process group whose ranks hold the pieces of one model; by default megatron's
    model-parallel group (TP x PP; data-parallel replicas hold whole copies and are not summed). On a single
    rank the operations are those of ``torch.nn.utils.clip_grad_norm_``, so it clips bit for bit as it does."""
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(model.parameters()).device)
    group = megatron_group("model_parallel") if group is None else group
    counted = [p.grad.detach() for p in model.parameters()
               if p.grad is not None and param_is_not_tensor_parallel_duplicate(p)]
    zero = torch.zeros((), device=grads[0].device)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in counted])) if counted \
        else zero
    if group is not None and torch.distributed.get_world_size(group) > 1:
        sq = norm.float().square()
        torch.distributed.all_reduce(sq, group=group)
        norm = sq.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].device))
    return norm
