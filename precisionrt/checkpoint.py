"""Checkpoints of a run directory: ``checkpoints/step_000123.pt``, written atomically and durably (fsync of
the file and of its directory before and after the rename), read with ``weights_only=True``. A truncated or
corrupt newest file is reported by name and the previous one is used; only the newest ``keep`` are kept."""

from __future__ import annotations

import os
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch

_NAME = re.compile(r"^step_(\d{6,})\.pt$")
# What torch.load raises for a file that was cut short or damaged (a zip archive that does not read back).
_DAMAGED = (EOFError, zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError)


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 0) -> Path:
    """Write ``state`` as the checkpoint of ``step``; then delete all but the newest ``keep`` (0: keep all).

    A failed write (a full disk) removes its partial ``.tmp`` and raises an error naming the path."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # a crash mid-write leaves the .tmp, never a truncated step_*.pt
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"could not write checkpoint {path}: {type(e).__name__}: {e}") from e
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
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
        except pickle.UnpicklingError as e:
            if "weights only" in str(e).lower():   # readable, but holds objects weights_only refuses: no fallback
                raise RuntimeError(f"checkpoint {path} holds objects that weights_only loading refuses: {e}") from e
            print(f"warning: checkpoint {path} is damaged ({type(e).__name__}: {e}); trying an older one",
                  file=sys.stderr)
        except _DAMAGED as e:   # truncated or corrupt: report it by name and fall back to an older one
            print(f"warning: checkpoint {path} is truncated or damaged ({type(e).__name__}: {e}); "
                  "trying an older one", file=sys.stderr)
    if found:
        raise RuntimeError(f"no readable checkpoint among {len(found)} in {Path(run_dir) / 'checkpoints'}")
    return None
