"""Checkpoints of a run directory: ``checkpoints/step_000123.pt``, written atomically, read with
``weights_only=True``. A truncated or corrupt newest file is reported by name and the previous one is used;
nothing is deleted."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

_NAME = re.compile(r"^step_(\d{6,})\.pt$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}.pt"


def save_checkpoint(run_dir: str | Path, step: int, state: dict) -> Path:
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the .tmp, never a truncated step_*.pt
    return path


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def load_latest_checkpoint(run_dir: str | Path) -> tuple[int, dict] | None:
    """The newest readable checkpoint as ``(step, state)``, or None if the run has none."""
    found = list_checkpoints(run_dir)
    for step, path in reversed(found):
        try:
            return step, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file: report it and fall back to an older one
            print(f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying an older one",
                  file=sys.stderr)
    if found:
        raise RuntimeError(f"no readable checkpoint among {len(found)} in {Path(run_dir) / 'checkpoints'}")
    return None
