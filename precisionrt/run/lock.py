"""One process per run directory: an OS-level advisory lock (``fcntl.flock``) on ``<run dir>/run.lock``, held
for the life of the run.

Two processes resuming one run would both write its checkpoints and its metrics (one died mid-rename, and
``metrics.jsonl`` held a step twice). The lock is taken before the run reads anything from its directory; a
second process is refused at start-up with a line naming the holder's PID, which the holder writes into the
lock file, and the holder is untouched. The kernel drops a ``flock`` when its process dies, however it dies,
so a stale lock file from a killed run never blocks a resume (no PID liveness guessing).

Within one process the lock is re-entrant (a notebook or a test that runs a command twice into one directory
is one process, not two); ``release`` lets it go at the end of a run.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from precisionrt.config import StartupError

LOCK_FILE = "run.lock"
_HELD: dict[str, int] = {}   # realpath of a run directory -> the descriptor holding its lock


def acquire(run_dir: str | Path) -> None:
    """Hold ``run_dir``'s lock (until ``release`` or the process ends); ``StartupError`` naming the holder's PID
    when another process holds it."""
    key = os.path.realpath(run_dir)
    if key in _HELD:
        return
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise StartupError(f"run.dir {str(run_dir)!r}: cannot open its lock {path} "
                           f"({'a symlink' if e.errno == errno.ELOOP else e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", errors="replace").strip() or "unknown"
        os.close(fd)
        raise StartupError(f"run.dir {str(run_dir)!r} is in use by process {holder} (it holds {path}); wait for "
                           "it to end or choose another run.dir") from None
    except OSError as e:
        os.close(fd)
        raise StartupError(f"run.dir {str(run_dir)!r}: cannot lock {path} ({e.strerror})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd


def release(run_dir: str | Path) -> None:
    """Let ``run_dir``'s lock go (the file stays: removing it would let a third process lock a new file while a
    second still waits on the old one)."""
    fd = _HELD.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)   # closing the last descriptor drops the flock


def held(run_dir: str | Path) -> bool:
    return os.path.realpath(run_dir) in _HELD
