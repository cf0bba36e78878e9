"""The runtime's state as entries of megatron's ``sharded_state_dict``, for ``dist_checkpointing.save/load``.

    state = {"model": model.sharded_state_dict(), "precision": rt.sharded_state_dict()}
    dist_checkpointing.save(state, ckpt_dir)
    ...
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict(), "precision": rt.sharded_state_dict()},
                                     ckpt_dir)
    model.load_state_dict(loaded["model"]); rt.load_sharded_state_dict(loaded["precision"])

What goes where, so that a checkpoint reshards (TP 2 -> 1, PP 2 -> 1) and keeps every layer's precision state:

* **per layer, keyed by global name** (``layout.py``): a ``ShardedObject`` ``<prefix>layers.<name>`` with the layer's
  scaling state and FLOP counts, written once by the replica at tensor- and data-parallel rank 0 and read by
  every rank that holds the layer in the loading layout. (Under TP the amax histories of delayed scaling are
  reduced across the TP group every step, so TP rank 0's are the layer's.)
* **common state** (identical on every rank; megatron writes it once): precisions of every layer, policy and
  monitor state, the run id, the step and the pending skipped steps; and each rank's open check window
  (statistics since the last check), sampling cursor and last-step FLOPs, gathered from every rank, with the
  layout that wrote them.
* A load in the **same layout** takes each rank's own window back: the resume is exact between checks too. A
  **resharded** load starts a fresh check window (the statistics of the steps since the last check are dropped,
  which is logged) and keeps everything else.

Saving and loading are collectives (one ``all_gather_object``): call both on every rank.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _layout() -> dict:
    from megatron.core import parallel_state

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if not parallel_state.model_parallel_is_initialized():
        return {"world": world, "tp": 1, "pp": 1}
    return {"world": world, "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size()}


def _replica_id() -> tuple[int, int]:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return (0, 0)
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(with_context_parallel=True))


def _gathered(value) -> list:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def sharded_state_dict(rt, prefix: str = "precision_runtime.") -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    full = rt.state_dict()
    mine = {"window": full["window"], "shadow_cursor": full["shadow_cursor"], "shadow_next": full["shadow_next"],
            "step_flops": full["step_flops"]}
    common = {"precisions": full["precisions"], "granularity": full["granularity"], "policy": full["policy"],
              "monitor": full["monitor"],
              "run_id": full["run_id"], "last_step": full["last_step"],
              **{k: full[k] for k in rt.skips.state_dict()},
              "layout": _layout(), "ranks": _gathered(mine)}
    out: dict = {"common": common}
    replica = _replica_id()
    for name in rt.layers:
        state = {"numerics": full["numerics"][name], "flops": full["flops"][name]}
        out[f"layers.{name}"] = ShardedObject(f"{prefix}layers.{name}", state, (1,), (0,), replica_id=replica)
    return out


def load_sharded_state_dict(rt, loaded: dict) -> None:
    common = loaded["common"]
    missing, unknown = set(rt.names) - set(common["precisions"]), set(common["precisions"]) - set(rt.names)
    if missing or unknown:
        raise ValueError(f"runtime state does not match the model: missing {sorted(missing)[:3]}, "
                         f"unknown {sorted(unknown)[:3]}")
    absent = [n for n in rt.layers if f"layers.{n}" not in loaded]
    if absent:
        raise ValueError(f"runtime state holds no entry for this rank's layers {absent[:3]}")
    same_layout = common["layout"] == _layout()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    per_layer = {n: loaded[f"layers.{n}"] for n in rt.layers}
    state = {**common, "numerics": {n: s["numerics"] for n, s in per_layer.items()},
             "flops": {n: s["flops"] for n, s in per_layer.items()}}
    if same_layout:
        state.update(common["ranks"][rank])
    else:
        last, since = common["last_step"], common["last_step"] % rt.config.monitor.check_interval
        dropped = (f"step {last} was a check: no statistics are dropped" if since == 0 else
                   f"the statistics of steps {last - since + 1}-{last}, since step {last - since}'s check, are dropped")
        log.info("precisionrt: runtime state saved at %s, loaded at %s: the check window restarts (%s)",
                 common["layout"], _layout(), dropped)
        state.update({"step_flops": [0, 0], "shadow_cursor": 0, "shadow_next": [],
                      "window": {n: {"stats": torch.zeros_like(layer.numerics.stats, device="cpu"),
                                     "grad_stats": torch.zeros_like(layer.numerics.grad_stats, device="cpu")}
                                 for n, layer in rt.layers.items()}})
    rt.load_state_dict(state)
