"""The operator control file: precision overrides an operator writes while a run goes on.

``precision_control.json`` in the run directory maps layer names or fnmatch patterns to ``"fp8"``, ``"bf16"``
(switch and hold) or ``"auto"`` (hand back to the policy); ``pattern:gemm`` (``fprop``, ``dgrad``, ``wgrad``)
names one GEMM of each layer it matches, e.g. ``{"decoder.layers.1.mlp.linear_fc2:wgrad": "bf16"}``. Rank 0
reads it at check steps when it changed; the runtime sends the per-GEMM codes to every rank in its packed
all-reduce.

The file is hostile input and never stops the run: it is read only if it is a regular file (not a FIFO that
would block, a device such as ``/dev/zero`` that never ends, a directory or a symlink loop), only up to
``MAX_BYTES``, and every entry is type-checked. Anything else is rejected with a message naming the file and
the problem, and the file is not read again until it changes. Write it atomically (write a temporary file,
then rename it over the old one): a reader that meets a half-written file rejects it and reads it again once
it is complete.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import torch

from precisionrt.layers.names import split_gemm
from precisionrt.observe.events import GEMMS

log = logging.getLogger(__name__)

CONTROL_CODES = {"fp8": 1, "bf16": 2, "auto": 3}
CODE_NAMES = {v: k for k, v in CONTROL_CODES.items()}
MAX_BYTES = 1 << 20


class ControlFile:
    """Reads ``path`` for the managed layer ``names``; ``reject(message)`` receives every refused entry."""

    def __init__(self, path: str | Path, names: list[str], reject: Callable[[str], None]):
        self.path = Path(path)
        self.names = names
        self.reject = reject
        self._seen: tuple[int, int, int] | None = None   # (inode, size, mtime) of the version last read

    def read(self) -> dict[tuple[str, str], str]:
        """``{(layer, gemm): action}`` requested by the file if it changed since the last read, else ``{}``."""
        try:
            st = os.stat(self.path)   # follows symlinks; a loop raises ELOOP
        except FileNotFoundError:
            return {}
        except OSError as e:   # the link itself identifies the version: report it once, not at every check
            try:
                link = os.lstat(self.path)
                version = (link.st_ino, link.st_size, link.st_mtime_ns)
            except OSError:
                version = None
            return {} if version == self._seen else self._refuse(version, f"cannot be read ({e.strerror or e})")
        version = (st.st_ino, st.st_size, st.st_mtime_ns)
        if version == self._seen:
            return {}
        self._seen = version
        if not stat.S_ISREG(st.st_mode):
            return self._refuse(version, "is not a regular file")
        if st.st_size > MAX_BYTES:
            return self._refuse(version, f"holds {st.st_size} bytes, more than the {MAX_BYTES} allowed")
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)   # never block, even if swapped for a FIFO
            with os.fdopen(fd, "rb") as fh:
                data = fh.read(MAX_BYTES + 1)
        except OSError as e:
            return self._refuse(version, f"cannot be read ({e.strerror or e})")
        if len(data) > MAX_BYTES:
            return self._refuse(version, f"holds more than the {MAX_BYTES} bytes allowed")
        try:
            spec = json.loads(data)
        except (ValueError, RecursionError) as e:   # RecursionError: absurdly deep nesting
            return self._refuse(version, f"is not valid JSON ({type(e).__name__}: {str(e)[:200]})")
        if not isinstance(spec, dict):
            return self._refuse(version, "must hold a JSON object {layer-or-pattern: 'fp8' | 'bf16' | 'auto'}")
        return self._requests(spec)

    def _requests(self, spec: dict) -> dict[tuple[str, str], str]:
        out: dict[tuple[str, str], str] = {}
        for pattern, action in spec.items():
            if not isinstance(action, str) or action not in CONTROL_CODES:
                self.reject(f"{self.path}: {pattern!r}: action {str(action)[:80]!r} is not one of "
                            f"{sorted(CONTROL_CODES)}")
                continue
            try:
                layer_pattern, gemm = split_gemm(pattern)
            except ValueError as e:
                self.reject(f"{self.path}: {e}")
                continue
            hits = [n for n in self.names if fnmatch.fnmatchcase(n, layer_pattern)]
            if not hits:
                self.reject(f"{self.path}: {pattern!r} matches no managed layer")
            else:
                out.update({(n, g): action for n in hits for g in ((gemm,) if gemm else GEMMS)})
        return out

    def _refuse(self, version, problem: str) -> dict:
        self._seen = version
        self.reject(f"{self.path} {problem}; ignored until it changes")
        return {}


class OperatorControl:
    """The control file as the runtime uses it: rank 0 reads and encodes it per layer for the check's packed
    all-reduce (other ranks send zeros; the MAX reduction delivers rank 0's codes everywhere), and every rank
    applies the codes it receives through the runtime's ``set_precision`` and ``release``."""

    def __init__(self, names: list[str]):
        self.names = names
        self.file: ControlFile | None = None   # rank 0 with a run directory reads one
        self.rejected: list[str] = []

    def open(self, path: Path) -> None:
        self.file = ControlFile(path, self.names, self.reject)

    def reject(self, message: str) -> None:
        self.rejected.append(message)
        log.warning("precisionrt: control file entry rejected: %s", message)

    def codes(self, device: torch.device) -> torch.Tensor:
        """Per-layer, per-GEMM request codes ``[layers, 3]`` (0: none), on ``device``."""
        requests = self.file.read() if self.file is not None else {}
        if not requests:   # the usual case: zeros made on the device, nothing copied from the host
            return torch.zeros(len(self.names), len(GEMMS), dtype=torch.float32, device=device)
        codes = torch.zeros(len(self.names), len(GEMMS), dtype=torch.float32)
        for (name, gemm), action in requests.items():
            codes[self.names.index(name), GEMMS.index(gemm)] = CONTROL_CODES[action]
        if device.type == "cuda":   # from pinned memory, asynchronously: no synchronisation with the host
            return codes.pin_memory().to(device, non_blocking=True)
        return codes.to(device)

    def apply(self, codes: list[dict[str, int]], step: int, set_precision: Callable,
              release: Callable[[str], None]) -> list:
        """Carry out received codes (per layer, ``{gemm: code}``): a switch and hold, or ``auto`` (release); a
        layer whose three GEMMs get one action is switched whole. A request the runtime refuses (a pinned GEMM,
        a layer that cannot run FP8) is rejected; the run goes on."""
        events = []
        for name, per_gemm in zip(self.names, codes):
            actions = {g: CODE_NAMES[c] for g, c in per_gemm.items() if c in CODE_NAMES}
            whole = len(actions) == len(GEMMS) and len(set(actions.values())) == 1
            targets = [(name, actions["fprop"])] if whole else [(f"{name}:{g}", a) for g, a in actions.items()]
            for target, action in targets:
                if action == "auto":
                    release(target)
                    continue
                try:
                    events += set_precision(target, action, reason="manual", step=step)
                except ValueError as err:
                    self.reject(str(err))
        return events
