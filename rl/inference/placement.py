"""Where the rollout engines run (``rollout.placement``, ``rollout.device``, ``executor.num_gpus``) and which
placements can be honoured.

``colocated``: the engine on the trainer's device (in its process, or, on a CPU machine, a Ray actor on the same
CPU). ``split``: elsewhere, either in the trainer's process on ``rollout.device`` or in Ray actors asking for
``executor.num_gpus`` GPUs each. ``executor.kind`` says which process, ``rollout.placement`` which device.
"""

from __future__ import annotations

import torch

from precisionrt.config import ConfigError


def rollout_device(cfg, trainer: torch.device) -> torch.device:
    """Where an engine in the trainer's process runs (``rollout.placement``, ``rollout.device``); ``cuda`` without
    an index is the current device, as torch means it."""
    if cfg.rollout.device == "auto":
        return trainer
    device = torch.device(cfg.rollout.device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def actor_gpus(cfg, trainer: torch.device) -> float:
    if cfg.executor.num_gpus >= 0:
        return cfg.executor.num_gpus
    return 1.0 if trainer.type == "cuda" and cfg.rollout.placement == "split" else 0.0


def check_placement(cfg, trainer: torch.device) -> None:
    """``rollout.placement`` against where the engines can run; each error names the keys."""
    r, kind = cfg.rollout, cfg.executor.kind
    if r.device != "auto":
        if kind == "ray":
            raise ConfigError(f'rollout.device = {r.device!r}: a Ray actor runs on its own device (executor.num_gpus); '
                              f'leave rollout.device = "auto" with executor.kind = "ray"')
        device = torch.device(r.device)
        if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
            raise ConfigError(f"rollout.device = {r.device!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if r.placement == "colocated":
        if rollout_device(cfg, trainer) != trainer:
            raise ConfigError(f'rollout.placement = "colocated" puts the engine on the trainer\'s device ({trainer}), '
                              f'not rollout.device = {r.device!r}: use placement = "split"')
        if kind == "ray" and trainer.type == "cuda":
            raise ConfigError('rollout.placement = "colocated" with executor.kind = "ray": a Ray actor cannot share the '
                              'trainer\'s GPU; use executor.kind = "local" (same process) or placement = "split"')
    elif kind == "local" and rollout_device(cfg, trainer) == trainer:
        raise ConfigError(f'rollout.placement = "split" in the trainer\'s process needs rollout.device naming another '
                          f'device than the trainer\'s ({trainer}), e.g. "cuda:1"; or executor.kind = "ray" (a process of '
                          f'its own, executor.num_gpus GPUs)')
    if kind == "local" and cfg.executor.num_gpus > 0:
        raise ConfigError("executor.num_gpus is what a Ray actor asks for; with executor.kind = \"local\" use "
                          "rollout.device")
