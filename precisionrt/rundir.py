"""The run directory (contract C3): one per run, holding config.json, metrics.jsonl, precision_events.jsonl,
summary.json and checkpoints/."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from precisionrt.config import ConfigError


@dataclass
class RunConfig:
    dir: str = ""     # empty: runs/<name>-<timestamp>
    name: str = "run"
    device: Literal["auto", "cpu", "cuda"] = "auto"   # auto: CUDA when a GPU is visible (one per torchrun rank)


def prepare_run_dir(cfg: RunConfig, resume: bool, is_main: bool = True) -> Path:
    """Resolve and create the run directory. Refuses to write a new run over a finished or started one
    (``train.resume = true`` continues it instead)."""
    path = Path(cfg.dir) if cfg.dir else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = (path / "config.json").exists()
    if started and not resume:
        raise ConfigError(
            f"run.dir {str(path)!r} already holds a run; set train.resume=true to continue it or choose another run.dir"
        )
    if is_main:
        path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: str | Path, obj) -> None:
    """Write atomically and durably: readers never see half a file, a crash never leaves an empty one."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(obj, indent=2, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())   # durable before it replaces the previous version
    os.replace(tmp, path)
