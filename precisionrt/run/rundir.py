"""The run directory (contract C3): one per run, holding config.json, metrics.jsonl, precision_events.jsonl,
summary.json and checkpoints/, and run.lock (the lock of the process running it, ``precisionrt.run.lock``)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from precisionrt.config import Checked, ConfigError, Name, PathText
from precisionrt.files import read_text, write_atomic
from precisionrt.observe.events import json_safe
from precisionrt.run import lock


@dataclass
class RunConfig(Checked):
    dir: PathText = ""
    """Empty: runs/<name>-<timestamp>."""
    name: Name = "run"
    device: Literal["auto", "cpu", "cuda"] = "auto"   # auto: CUDA when a GPU is visible (one per torchrun rank)


def resolve_run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.dir) if cfg.dir else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(path: Path) -> None:
    """Refuse a run directory that cannot be one: a file, or one that cannot be created or written."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run.dir {str(path)!r} is a file, not a directory")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"run.dir {str(path)!r} cannot be created: {str(ancestor)!r} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir {str(path)!r} cannot be written: {str(ancestor)!r} is not writable")


def prepare_run_dir(cfg: RunConfig, resume: bool, is_main: bool = True, path: Path | None = None) -> Path:
    """Create the run directory (``path``, or the one ``cfg`` names) and take its lock (``precisionrt.run.lock``:
    a second process is refused, naming the holder). Refuses to write a new run over a finished or started one
    (``train.resume = true`` continues it instead)."""
    path = path or resolve_run_dir(cfg)
    taken = ConfigError(
        f"run.dir {str(path)!r} already holds a run; set train.resume=true to continue it or choose another run.dir")
    if not is_main:   # rank 0 alone checks and claims (the others would see its claim as a taken directory)
        return path
    check_run_dir(path)
    if (path / "config.json").exists() and not resume:
        raise taken
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run.dir {str(path)!r} cannot be created: {e.strerror}") from None
    lock.acquire(path)   # one process per run directory, before anything in it is read or written
    if not resume:
        # claim the directory atomically: of two launches into it, exactly one creates config.json (a
        # placeholder until the resolved configuration replaces it) and the other is refused
        try:
            os.close(os.open(path / "config.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise taken from None
    return path


def truncate_metrics(path: str | Path, step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` logged after ``step``: a run resumed from the checkpoint of
    ``step`` logs those steps again, and readers must never see a step twice. A torn last line (a crash
    mid-write) goes too; other unreadable lines are kept. Returns the number of rows dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = read_text(path, "metrics.jsonl", limit=1 << 40, errors="replace").splitlines()
    keep, dropped = [], 0
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                dropped += 1
            else:
                keep.append(line)
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        write_atomic(path, "".join(line + "\n" for line in keep))
    return dropped


def _strict(obj):
    """``obj`` with every nonfinite float replaced as ``events.json_safe`` does: the file stays valid JSON."""
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return json_safe(obj)


def write_json(path: str | Path, obj) -> None:
    """Write atomically and durably: readers never see half a file, a crash never leaves an empty one. NaN
    becomes null and +-inf "inf"/"-inf": a strict JSON reader reads every summary."""
    write_atomic(path, json.dumps(_strict(obj), indent=2, default=str, allow_nan=False) + "\n")
