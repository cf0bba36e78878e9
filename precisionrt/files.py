"""Files from elsewhere, floor 0 (the standard library only): writes that own what they replace, and reads that
stay inside what they were given.

Every writer of a run (checkpoints and their digests, the run directory's JSON files, the ``to_hf`` export, the
logs' creation) goes through ``atomic_file`` or ``atomic_dir``: the new content is written beside its target
under a hidden temporary name and renamed into place only once whole and durable; every failure path, an
interrupt included, removes the temporary and leaves the previous content as it was.

Every reader of a file it did not write (a checkpoint, a config, a shard, a tokenizer file, a log) first checks
that it is a regular file (``regular_file``, ``open_regular``): a FIFO would block ``open`` forever, a device
would stream forever, a directory is a confusing ``IsADirectoryError`` several frames down. Names that come from
inside a file (a shard index's ``weight_map``) must resolve inside the directory the file came with
(``inside``), symlinks followed, or are refused.

Why its own module on the lowest floor: ``observe`` (the logs) and ``run``/``models`` (checkpoints, exports) both
need it, and ``observe`` may import nothing above ``config``.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

PathLike = str | os.PathLike


class UnsafeFile(ValueError):
    """A path that is not what its reader or writer needs (a FIFO, a device, a directory, a symlink out of its
    directory, a name outside it); the message names the path and what it is."""


def kind_of(mode: int) -> str:
    """What a file of ``mode`` (``st_mode``) is, in words."""
    for test, words in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return words
    return "a special file"


def regular_file(path: PathLike, what: str = "") -> os.stat_result:
    """``os.stat`` of ``path`` (symlinks followed), refusing anything but a regular file before it is opened.
    A missing file raises ``FileNotFoundError`` as usual; ``what`` says what the file should have been."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(f"{os.fspath(path)}: {kind_of(st.st_mode)}, not a regular file{f' ({what})' if what else ''}")
    return st


@contextmanager
def open_regular(path: PathLike, mode: str = "rb", what: str = "", follow: bool = True) -> Iterator[IO]:
    """``open(path, mode)`` for reading, refusing before any read what is not a regular file. Opened
    non-blocking, so that a FIFO cannot stall the open itself, then checked on the open descriptor (no window
    between the check and the open); ``follow=False`` also refuses a symlink."""
    if "r" not in mode or "+" in mode:
        raise ValueError(f"open_regular reads; mode {mode!r}")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise UnsafeFile(f"{os.fspath(path)}: a symlink, not a regular file{f' ({what})' if what else ''}") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{os.fspath(path)}: {kind_of(st.st_mode)}, not a regular file"
                             f"{f' ({what})' if what else ''}")
        os.set_blocking(fd, True)
        fh = os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def read_text(path: PathLike, what: str = "", limit: int = 1 << 30, errors: str = "strict") -> str:
    """A regular file's text (UTF-8, decoded with ``errors``), at most ``limit`` bytes (a larger file is refused,
    not read)."""
    with open_regular(path, "rb", what) as fh:
        if os.fstat(fh.fileno()).st_size > limit:
            raise UnsafeFile(f"{os.fspath(path)}: larger than {limit:,} bytes{f' ({what})' if what else ''}")
        data = fh.read()
    return data.decode("utf-8", errors=errors)


def read_json(path: PathLike, what: str = "", limit: int = 1 << 30):
    """A regular file's JSON. Damage is a ``ValueError`` naming the file: not UTF-8, not JSON, or nested so
    deep that the parser would recurse past Python's limit."""
    text = read_text(path, what, limit)
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{os.fspath(path)}: JSON nested too deeply") from None


def read_json_or(error: type[Exception], path: PathLike, what: str = "", limit: int = 1 << 30):
    """``read_json`` with each failure as one ``error`` naming the file: unsafe (``UnsafeFile``'s message),
    unreadable, or not valid JSON. A missing file stays ``FileNotFoundError``, for the caller to say what the file
    is for."""
    try:
        return read_json(path, what, limit)
    except UnsafeFile as e:
        raise error(str(e)) from None
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"{os.fspath(path)}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:   # not UTF-8, not JSON, nested too deeply
        raise error(f"{os.fspath(path)}: not valid JSON ({e})") from None


def inside(base: PathLike, name, what: str = "a file name", roots: tuple[str, ...] = ()) -> str:
    """``base/name``, refused unless ``name`` is a relative path string that stays inside ``base`` once every
    symlink is resolved (``../x``, ``/etc/x`` and a symlink out of ``base`` are all refused). ``roots``: further
    directories a symlink in ``base`` may point into (a Hugging Face hub snapshot's blobs)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise UnsafeFile(f"{os.fspath(base)}: {what} {name!r} is not a file name")
    if os.path.isabs(name):
        raise UnsafeFile(f"{os.fspath(base)}: {what} {name!r} is an absolute path; only names inside the "
                         "directory are read")
    root = os.path.realpath(base)
    if ".." in Path(name).parts:
        raise UnsafeFile(f"{os.fspath(base)}: {what} {name!r} climbs out of the directory")
    full = os.path.realpath(os.path.join(root, name))
    if not any(os.path.commonpath([r, full]) == r for r in (root, *map(os.path.realpath, roots))):
        raise UnsafeFile(f"{os.fspath(base)}: {what} {name!r} resolves to {full}, outside the directory")
    return os.path.join(os.fspath(base), name)


def fsync_dir(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(path: Path, tag: str) -> Path:
    # hidden, beside the target (a rename never crosses a file system), unique (two writers never share one)
    return path.with_name(f".{path.name}.{tag}-{secrets.token_hex(4)}")


@contextmanager
def atomic_file(path: PathLike, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """A file opened for writing that becomes ``path`` when the block ends without an exception: written under
    a temporary name beside ``path``, flushed (and fsynced with its directory when ``durable``), then renamed
    over ``path``. Any failure removes the temporary and leaves ``path`` as it was. ``path`` may not be a
    directory or a symlink (replacing one would not be a file write)."""
    path = Path(path)
    if os.path.islink(path) or path.is_dir():
        raise UnsafeFile(f"{path}: {'a symlink' if os.path.islink(path) else 'a directory'}; a file is written "
                         "here only over a regular file")
    tmp = _temporary_name(path, "tmp")
    # read-write: a caller may read back what it wrote (a checkpoint's digest); 0o666 & ~umask, as open()
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_atomic(path: PathLike, data: bytes | str, durable: bool = True) -> None:
    """``data`` as the whole content of ``path``, through ``atomic_file``."""
    with atomic_file(path, "wb", durable) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """A new directory that becomes ``path`` when the block ends without an exception. The caller decides
    beforehand that an existing ``path`` is its own to replace (``atomic_dir`` replaces a directory, never a
    file, a symlink or a mount point). The old directory is moved aside, the new one moved in, then the old
    one removed; a failed move puts the old one back. Every failure removes the new directory: nothing of it,
    and nothing moved aside, is left behind."""
    path = Path(path)
    if os.path.islink(path) or (path.exists() and not path.is_dir()) or os.path.ismount(path):
        what = "a symlink" if os.path.islink(path) else "a mount point" if os.path.ismount(path) else "not a directory"
        raise UnsafeFile(f"{path}: {what}; only a directory is replaced")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path, "partial")
    tmp.mkdir()
    try:
        yield tmp
        for root, _, files in os.walk(tmp):   # durable before it replaces the previous version
            for name in files:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(root)
        aside = None
        if path.exists():
            aside = _temporary_name(path, "old")
            os.rename(path, aside)
        try:
            os.rename(tmp, path)
        except BaseException:
            if aside is not None:
                os.rename(aside, path)
            raise
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside)


def open_append(path: PathLike) -> IO[str]:
    """A log file opened for appending (created if missing), refused unless it is a regular file: appending
    to a FIFO blocks until someone reads it, and a symlink would write wherever it points."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFile(f"{os.fspath(path)}: a symlink; a log is appended only to a regular file") from None
        if e.errno == errno.ENXIO:   # a FIFO nobody reads: O_NONBLOCK makes the open fail instead of waiting
            raise UnsafeFile(f"{os.fspath(path)}: a FIFO; a log is appended only to a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{os.fspath(path)}: {kind_of(st.st_mode)}; a log is appended only to a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise
