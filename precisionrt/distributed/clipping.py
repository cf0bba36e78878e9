"""Gradient clipping by the norm of the whole model, as Megatron computes it under model parallelism.

``torch.nn.utils.clip_grad_norm_`` sees only this rank's parameters. Under tensor parallelism each rank holds a
shard of every linear weight, so its norm is not the model's, the ranks clip by different coefficients, and
the parameters every TP rank holds a copy of (norms, biases of row-parallel layers, position embeddings) drift
apart: 1.15e-3 after a few steps in megatron's own example loop. Megatron's optimizer (``clip_grad``) avoids it
by counting each parameter once: a TP-duplicated parameter only on TP rank 0 (``tensor_model_parallel``
attribute, ``param_is_not_tensor_parallel_duplicate``), the last pipeline stage's copy of a tied embedding not at
all (``shared``), then one all-reduce of the squared norm over the model-parallel group (TP x PP), so every rank
gets the same norm and clips alike.

Where the gradients are (megatron's own rule, ``finalize_model_grads._get_main_grad_attr``): in ``param.main_grad``
when megatron's ``DistributedDataParallel`` wraps the model (its backward hook adds ``.grad`` into a view of its
gradient buffer and sets ``.grad = None``), else in ``.grad``. Call it after ``finalize_model_grads`` (which
megatron's schedule calls when ``config.finalize_model_grads_func`` is set): only then are the gradients reduced
over the data-parallel group, and under ``overlap_grad_reduce`` only then has the collective finished writing them.
With megatron's distributed optimizer (``use_distributed_optimizer``) each rank holds the data-parallel sum only
for its own shard of each bucket (the reduce-scatter writes nothing else), so the norm counts each rank's shard
and sums the squares over the data-parallel group too; this needs the ``DistributedDataParallel`` wrapper, whose
buckets say where the shards are.
"""

from __future__ import annotations

import torch

from precisionrt.distributed.groups import megatron_group


def _grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


def _norm(g: torch.Tensor) -> torch.Tensor:
    # fp32 grads as torch's clip_grad_norm_ computes them (bit for bit); a bf16 main_grad accumulates in fp32
    return torch.linalg.vector_norm(g) if g.dtype == torch.float32 else torch.linalg.vector_norm(g, dtype=torch.float32)


def _chunks(model) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _distributed_optimizer_ddp(chunk: torch.nn.Module):
    """``chunk`` when it is megatron's DistributedDataParallel with the distributed optimizer's sharded buffers."""
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel

    config = getattr(chunk, "ddp_config", None)
    if isinstance(chunk, _BaseDataParallel) and getattr(config, "use_distributed_optimizer", False):
        return chunk
    return None


def _shard_pieces(ddp, pieces: dict) -> set:
    """Add to ``pieces`` (``{group: [tensor]}``, the group whose ranks hold the other shards) the pieces of each
    parameter's ``main_grad`` inside this rank's shard of each bucket (the elements the reduce-scatter made the
    data-parallel sum here); returns the parameters the buckets hold. Every bucket group's group gets an entry, so
    every rank makes the same collectives."""
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

    params = set()
    for bucket_group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
        size = bucket_group.intra_distributed_optimizer_instance_size
        rank = bucket_group.intra_distributed_optimizer_instance_rank
        group = bucket_group.intra_distributed_optimizer_instance_group
        mine = pieces.setdefault(group, [])
        for bucket in bucket_group.buckets:
            shard = bucket.grad_data.numel() // size
            lo, hi = rank * shard, (rank + 1) * shard
            for p in bucket.params_list:
                params.add(p)
                if getattr(p, "shared", False) or not param_is_not_tensor_parallel_duplicate(p):
                    continue
                # main_grad and grad_data are views of one buffer: the storage offsets place the parameter
                start = p.main_grad.storage_offset() - bucket.grad_data.storage_offset()
                a, b = max(lo, start), min(hi, start + p.numel())
                if a < b:
                    mine.append(p.main_grad.view(-1)[a - start:b - start])
    return params


def clip_grad_norm_(model: torch.nn.Module | list[torch.nn.Module], max_norm: float, group=None) -> torch.Tensor:
    """Scale the gradients of ``model`` (a module, megatron's or torch's DDP wrapper, or a list of model chunks) so
    that the norm of the whole model's gradient is at most ``max_norm``; returns that norm as a device tensor (no
    host synchronisation). The gradients are ``param.main_grad`` where megatron's DDP keeps them, else ``.grad``.

    ``group``: the process group whose ranks hold the pieces of one model; by default megatron's
    model-parallel group (TP x PP; data-parallel replicas hold whole copies and are not summed). With megatron's
    distributed optimizer the data-parallel shards are summed too. On a single rank the operations are those of
    ``torch.nn.utils.clip_grad_norm_``, so it clips bit for bit as it does."""
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

    chunks = _chunks(model)
    params = [p for chunk in chunks for p in chunk.parameters()]
    grads = [g for g in map(_grad, params) if g is not None]
    if not grads:
        return torch.zeros((), device=params[0].device)
    counted, sharded_groups = [], {}
    for chunk in chunks:
        ddp = _distributed_optimizer_ddp(chunk)
        if ddp is None:
            continue
        in_buckets = _shard_pieces(ddp, sharded_groups)
        params_left = [p for p in chunk.parameters() if p not in in_buckets]
        counted += [_grad(p).detach() for p in params_left if _grad(p) is not None]
    plain = [p for chunk in chunks if _distributed_optimizer_ddp(chunk) is None for p in chunk.parameters()]
    for p in plain:
        if getattr(p, "main_grad", None) is not None and p.untyped_storage().nbytes() > p.numel() * p.element_size():
            # megatron's distributed optimizer re-points param.data into its parameter buffer (a storage larger than
            # the parameter); its main_grad then holds this rank's local gradient outside this rank's shard, and
            # only the wrapper knows the shards
            raise ValueError("clip_grad_norm_: the parameters' gradients live in the buffers of megatron's "
                             "distributed optimizer, where each rank holds reduced values for its own shard only: "
                             "pass the DistributedDataParallel wrapper (or the list of them), not the model inside")
    counted += [_grad(p).detach() for p in plain if _grad(p) is not None and not getattr(p, "shared", False)
                and param_is_not_tensor_parallel_duplicate(p)]
    device = grads[0].device
    zero = torch.zeros((), device=device)
    norm = torch.linalg.vector_norm(torch.stack([_norm(g) for g in counted])) if counted else zero
    group = megatron_group("model_parallel") if group is None else group
    if sharded_groups:
        sq = norm.float().square()
        for shard_group, pieces in sharded_groups.items():   # each rank's shard, summed over its group
            part = torch.stack([_norm(g) for g in pieces]).square().sum() if pieces else torch.zeros((), device=device)
            torch.distributed.all_reduce(part, group=shard_group)
            sq = sq + part
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(sq, group=group)
        norm = sq.sqrt()
    elif group is not None and torch.distributed.get_world_size(group) > 1:
        sq = norm.float().square()
        torch.distributed.all_reduce(sq, group=group)
        norm = sq.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef.to(device))
    return norm
