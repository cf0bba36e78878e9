"""Checkpoints of a run directory: ``checkpoints/step_000123.pt`` (one process, or no model parallelism) or,
under model parallelism, one file per model-parallel rank: ``step_000123.tp1.pt`` under tensor parallelism,
``step_000123.pp1.pt`` under pipeline parallelism, ``step_000123.tp1.pp0.pt`` under both (each rank holds its
own shard of the weights, of the optimizer state and of the FP8 scaling state; data-parallel replicas are
identical, so the processes of data-parallel rank 0 write). Files are written atomically and
durably (``precisionrt.files.atomic_file``), each with its sha256 digest beside it
(``step_000123.pt.sha256``), read with ``weights_only=True``, and only the newest ``keep`` steps are kept. A
checkpoint carries its step and the run's resolved configuration; a resume takes both from the content, never
from the file name. A truncated, corrupt, unverifiable (no digest) or special (a FIFO, a directory) newest
checkpoint is reported by name and the previous one is used, the same step on every rank; one whose content
names another step is refused. A checkpoint written at another layout (TP or PP size) is refused with both
layouts named."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from precisionrt.files import UnsafeFile, atomic_file, open_regular, read_text, regular_file, write_atomic

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{6,})(?:\.(tp\d+(?:\.pp\d+)?|pp\d+))?\.pt$")
# What torch.load raises for a file that was cut short or damaged (a zip archive that does not read back).
_DAMAGED = (EOFError, zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or one that is not what its name says; the message names the file."""


def shard_name(tp_rank: int, tp_size: int, pp_rank: int = 0, pp_size: int = 1) -> str | None:
    """This model-parallel rank's part of a checkpoint's file name (``tp1``, ``pp0``, ``tp1.pp0``); None
    without model parallelism (the unsharded file)."""
    parts = ([f"tp{tp_rank}"] if tp_size > 1 else []) + ([f"pp{pp_rank}"] if pp_size > 1 else [])
    return ".".join(parts) or None


def layout_of(shards: set[str | None]) -> str:
    """The parallel layout that wrote files of ``shards``, in words."""
    tp = len({s.split(".")[0] for s in shards if s and s.startswith("tp")}) or 1
    pp = len({p for s in shards if s for p in s.split(".") if p.startswith("pp")}) or 1
    return f"tensor_model_parallel_size {tp}, pipeline_model_parallel_size {pp}"


def checkpoint_path(run_dir: str | Path, step: int, shard: str | None = None) -> Path:
    """The file of ``step`` (of model-parallel shard ``shard``, see ``shard_name``; None: the unsharded file)."""
    suffix = "" if shard is None else f".{shard}"
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}{suffix}.pt"


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 0, shard: str | None = None,
                    config: dict | None = None) -> Path:
    """Write ``state`` as the checkpoint of ``step`` (this model-parallel rank's ``shard``, see ``shard_name``);
    then delete all but the newest ``keep`` of this rank's (0: keep all). The file carries its own step and, when
    given, the run's resolved ``config``: a resume reads both from the content, never from the file name.

    The write goes through ``precisionrt.files.atomic_file``: a failed write (a full disk) leaves no temporary
    and no truncated checkpoint, and raises an error naming the path."""
    path = checkpoint_path(run_dir, step, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {**state, "step": step, **({"config": config} if config is not None else {})}
    try:
        with atomic_file(path) as fh:
            torch.save(state, fh)
            fh.flush()
            # the digest first: a checkpoint never exists without it (bytes damaged later, which a zip archive can
            # still load as wrong numbers, are then caught at load time)
            write_atomic(_digest_path(path), _sha256_fd(fh.fileno()) + "\n")
    except (OSError, RuntimeError, UnsafeFile) as e:
        raise CheckpointError(f"could not write checkpoint {path}: {type(e).__name__}: {e}") from e
    if keep > 0:
        for _, old in list_checkpoints(run_dir, shard)[:-keep]:
            old.unlink(missing_ok=True)
            _digest_path(old).unlink(missing_ok=True)
    return path


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256_fd(fd: int) -> str:
    h, offset = hashlib.sha256(), 0
    while block := os.pread(fd, 1 << 20, offset):
        h.update(block)
        offset += len(block)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    with open_regular(path, "rb", "a checkpoint") as fh:
        return _sha256_fd(fh.fileno())


def list_checkpoints(run_dir: str | Path, shard: str | None = None) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints of one shard (None: unsharded), oldest first."""
    return sorted((step, p) for step, theirs, p in _all_files(run_dir) if theirs == shard)


def _all_files(run_dir: str | Path) -> list[tuple[int, str | None, Path]]:
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return [(int(m.group(1)), m.group(2), p) for p in d.iterdir() if (m := _NAME.match(p.name))]


class CheckpointMismatch(CheckpointError):
    """A readable, verified checkpoint that is not what its name says (another step: renamed or copied)."""


def _load(path: Path, step: int) -> dict | None:
    """The state in ``path``; None (reported by name) when it cannot be trusted: not a regular file, no digest
    beside it (nothing to verify it by), bytes that no longer match the digest, or a file that does not read
    back. A verified checkpoint whose content names another step than its file name is an error
    (``CheckpointMismatch``): a copy or rename that must not decide where the run continues."""
    digest = _digest_path(path)
    try:
        regular_file(path, "a checkpoint")
        expected = read_text(digest, "a checkpoint's digest", limit=1024).strip()
        actual = _sha256(path)
    except FileNotFoundError as e:
        log.warning("warning: checkpoint %s has no digest (%s is missing): it cannot be verified; trying an "
                    "older one", path, Path(e.filename or digest).name)
        return None
    except (OSError, ValueError) as e:   # a FIFO, a directory, an unreadable file: reported, never opened blocking
        log.warning("warning: checkpoint %s cannot be verified (%s); trying an older one", path, e)
        return None
    if expected != actual:
        log.warning("warning: checkpoint %s is damaged (its sha256 does not match %s); trying an older one",
                    path, digest.name)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():   # readable, but holds objects weights_only refuses: no fallback
            first = str(e).strip().splitlines()[0]   # torch's message runs over many lines of advice
            raise RuntimeError(f"checkpoint {path} holds objects that weights_only loading refuses ({first})") from e
        log.warning("warning: checkpoint %s is damaged (%s: %s); trying an older one", path, type(e).__name__, e)
        return None
    except _DAMAGED as e:   # truncated or corrupt: report it by name and fall back to an older one
        log.warning("warning: checkpoint %s is truncated or damaged (%s: %s); trying an older one", path,
                    type(e).__name__, e)
        return None
    if not isinstance(state, dict) or state.get("step") != step:
        held = state.get("step") if isinstance(state, dict) else type(state).__name__
        raise CheckpointMismatch(f"checkpoint {path} holds step {held!r}, not {step}: a renamed or copied file "
                                 "decides nothing; move it out of the checkpoints directory")
    return state


def _distributed(group) -> bool:
    return group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1


def _all_ranks_agree(ok: bool, group) -> bool:
    if not _distributed(group):
        return ok
    device = "cuda" if torch.distributed.get_backend(group) == "nccl" else "cpu"
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _common_steps(steps: set[int], group) -> set[int]:
    """Steps every rank has a file for (a crash can leave one rank's newest shard unwritten)."""
    if not _distributed(group):
        return steps
    everyone: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(everyone, sorted(steps), group=group)
    return set.intersection(*(set(s) for s in everyone))


def load_latest_checkpoint(run_dir: str | Path, shard: str | None = None, layout: dict | None = None,
                           group=None) -> tuple[int, dict] | None:
    """The newest checkpoint readable on every rank of ``group``, as ``(step, this rank's state)``, or None if
    the run has none. ``shard`` names this process's files (``shard_name``; None: unsharded), ``layout`` its
    parallel sizes (``{"tensor_model_parallel_size": 2, ...}``, as saved under the state's ``"parallel"``);
    files of another layout are refused with an error naming both layouts."""
    layout = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, **(layout or {})}
    described = ", ".join(f"{k} {v}" for k, v in layout.items())
    files = _all_files(run_dir)
    mine = list_checkpoints(run_dir, shard)
    if files and not mine:
        raise ValueError(f"checkpoints in {Path(run_dir) / 'checkpoints'} were written at "
                         f"{layout_of({s for _, s, _ in files})}; this run uses {described}")
    # every rank walks the same candidate steps, newest first, and all must read a step for it to be taken
    for step in sorted(_common_steps({step for step, _ in mine}, group), reverse=True):
        state = _load(checkpoint_path(run_dir, step, shard), step)
        if _all_ranks_agree(state is not None, group):
            saved = {k: state.get("parallel", {}).get(k, 1) for k in layout}
            if saved != layout:
                raise ValueError(f"checkpoint {checkpoint_path(run_dir, step, shard)} was written at "
                                 f"{', '.join(f'{k} {v}' for k, v in saved.items())}; this run uses {described}")
            return step, state
    if mine:
        raise RuntimeError(f"no readable checkpoint among {len(mine)} in {Path(run_dir) / 'checkpoints'}")
    return None
