"""The precision switch log (contract C4): schema version 2, JSON Lines, append-only, one record per line.

Version 2 decides per GEMM: every switch record names the one GEMM of its layer that changed (``"gemm"``:
``"fprop"``, ``"dgrad"`` or ``"wgrad"``; a whole-layer change is three records of one step and reason), and stats
records give each layer's per-GEMM precisions (``"gemms"``). Readers accept versions 1 (whole layers: a switch
moves all three GEMMs) and 2; ``gemm_of`` reads either.

Written by rank 0, flushed per record, so a crash leaves a valid prefix. Readers skip and count lines that do
not parse, never failing a whole file for one bad line. This module imports neither torch nor megatron: the
offline tools use it on machines that have only the logs.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, get_args

from precisionrt.files import open_append, open_regular

Precision = Literal["fp8", "bf16"]
Gemm = Literal["fprop", "dgrad", "wgrad"]
"""A linear layer's three GEMMs: ``y = x W^T`` (fprop), ``dx = dY W`` (dgrad), ``dW = dY^T x`` (wgrad)."""
Reason = Literal["overflow", "underflow", "quant_error", "grad_sensitivity", "nonfinite",   # promotions
                 "probation", "budget",                                                      # returns to FP8
                 "manual",                                                                   # operator
                 "mismatch",   # RL: the layer carries the train/inference mismatch (rl/algo/attribution.py)
                 "speed"]      # the speed plan: this GEMM is not faster in FP8 here (precisionrt/runtime/speed_plan.py)
# Why the rollout engine's copy of a layer changed precision: it followed the trainer's switch, or the layer was
# promoted on the rollout side for the mismatch it carried.
RolloutReason = Literal["follow", "mismatch"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
GEMMS: tuple[str, ...] = get_args(Gemm)
MIXED = "mixed"   # ``PrecisionRuntime.precisions()`` of a layer whose GEMMs differ


def layer_precision(gemms) -> str:
    """A layer's precision from its GEMMs' (a mapping or sequence of precisions): theirs when they agree, else
    ``"mixed"``."""
    values = set(gemms.values() if isinstance(gemms, dict) else gemms)
    return values.pop() if len(values) == 1 else MIXED
REASONS: tuple[str, ...] = get_args(Reason)
ROLLOUT_REASONS: tuple[str, ...] = get_args(RolloutReason)
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
KINDS = ("run_start", "switch", "stats", "run_end", "rollout_switch")
EVENTS_FILE = "precision_events.jsonl"   # the log's name in a run directory
# Every record is compact JSON opening with the version and kind (``_write``), so a reader can recognise our
# stats lines, the bulk of a log, by this prefix and check them cheaply instead of parsing them.
STATS_PREFIXES = tuple(b'{"v":%d,"kind":"stats",' % v for v in READABLE_VERSIONS)
STATS_PREFIX = STATS_PREFIXES[-1]   # what this version writes


def json_safe(v):
    """A value JSON can carry: NaN becomes null, +-inf the strings "inf"/"-inf" (json would write invalid
    tokens for them)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


@dataclass(frozen=True)
class SwitchEvent:
    """One GEMM of one layer changed precision."""

    step: int
    layer: str
    gemm: Gemm
    from_: Precision
    to: Precision
    reason: Reason
    signals: dict = field(default_factory=dict)

    def __post_init__(self) -> None:   # a new reason or precision must enter the schema above first
        if self.from_ not in PRECISIONS or self.to not in PRECISIONS or self.reason not in REASONS \
                or self.gemm not in GEMMS:
            raise ValueError(f"switch {self.gemm!r} {self.from_!r} -> {self.to!r} ({self.reason!r}) is outside the "
                             f"log schema: GEMMs {GEMMS}, precisions {PRECISIONS}, reasons {REASONS}")

    def summary(self) -> dict:
        """The C7 summary form: ``{step, layer, gemm, from, to, reason}``."""
        return {"step": self.step, "layer": self.layer, "gemm": self.gemm, "from": self.from_, "to": self.to,
                "reason": self.reason}


def gemm_of(record: dict) -> tuple[str, ...]:
    """The GEMMs a switch record moved: its ``gemm`` (schema 2), or all three (schema 1: whole layers)."""
    return (record["gemm"],) if "gemm" in record else GEMMS


class EventLog:
    """Append-only writer of the switch log (``EVENTS_FILE``). A no-op unless ``enabled`` (rank 0 writes)."""

    def __init__(self, path: str | Path, run_id: str, enabled: bool = True):
        self.path = Path(path)
        self.run_id = run_id
        self.enabled = enabled
        self.started = False   # a run_start record is written
        self._deferred_start = None
        self._fh = None
        if enabled:
            # created (or reopened) only as a regular file: a FIFO, a device or a symlink in its place is refused
            self._fh = open_append(self.path)
            # A crash can leave a last line without its newline: start on a fresh line so that the partial
            # record stays one (skipped) line and does not swallow the next record.
            if os.fstat(self._fh.fileno()).st_size > 0:
                with open_regular(self.path, "rb", "the switch log") as fh:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        self._fh.write("\n")

    def defer_start(self, fields) -> None:
        """Write run_start just before the next record, with the fields ``fields()`` returns then (``layers``,
        ``config``, ``resumed_from``): what a run starts from may still change (a checkpoint loaded after the log
        was opened), and the log must say what it started from."""
        self._deferred_start = fields

    def begin(self) -> None:
        """Write the deferred run_start now (before a change that its layer table must not show yet)."""
        if self._deferred_start is not None:
            start, self._deferred_start = self._deferred_start, None
            if self._fh is None:   # a rank that does not write: nothing to build
                self.started = True
            else:
                self.run_start(**start())

    def _write(self, kind: str, **fields) -> None:
        if kind != "run_start":
            self.begin()
        if self._fh is None:
            return
        record = {"v": SCHEMA_VERSION, "kind": kind, "run": self.run_id, "time": time.time(), **fields}
        self._fh.write(json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def run_start(self, layers: list[dict], config: dict, resumed_from: int | None = None) -> None:
        """``resumed_from``: the checkpoint step a resumed run continues from. Records of an earlier segment
        with a later step (written after that checkpoint, before a crash) are superseded by this segment's."""
        extra = {} if resumed_from is None else {"resumed_from": resumed_from}
        self._deferred_start = None
        self.started = True
        self._write("run_start", layers=layers, config=config, **extra)

    def switch(self, event: SwitchEvent) -> None:
        self._write("switch", step=event.step, layer=event.layer, gemm=event.gemm, **{"from": event.from_},
                    to=event.to, reason=event.reason, signals=event.signals)

    def rollout_switch(self, step: int, layer: str, from_: Precision, to: Precision, reason: RolloutReason,
                       map_version: int, signals: dict | None = None) -> None:
        """The rollout engine's copy of ``layer`` runs ``to`` from precision-map ``map_version`` on (published
        after optimizer step ``step``; the engine takes it with the next weights it loads)."""
        if from_ not in PRECISIONS or to not in PRECISIONS or reason not in ROLLOUT_REASONS:
            raise ValueError(f"rollout switch {from_!r} -> {to!r} ({reason!r}) is outside the log schema")
        self._write("rollout_switch", step=step, layer=layer, **{"from": from_}, to=to, reason=reason,
                    map_version=map_version, signals={k: json_safe(v) for k, v in (signals or {}).items()})

    def stats(self, step: int, layers: dict) -> None:
        self._write("stats", step=step, layers=layers)

    def run_end(self, step: int) -> None:
        self._write("run_end", step=step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@dataclass
class ReadResult:
    records: list[dict]
    skipped_lines: int
    skipped_examples: list[str]


MAX_STEP = 2**53   # steps are integers a float can hold exactly; beyond that a "step" is garbage


def _is_step(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -1 <= v < MAX_STEP


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _valid_layer_entry(e) -> bool:
    return (isinstance(e, dict) and isinstance(e.get("name"), str) and _is_step(e.get("index"))
            and _is_number(e.get("gemm_flops_per_token")) and e["gemm_flops_per_token"] >= 0)


# Per kind, what a record must hold beyond v/kind/run/time, with its type: readers rely on every field below.
_FIELDS = {
    "run_start": lambda r: isinstance(r.get("layers"), list) and all(map(_valid_layer_entry, r["layers"]))
    and isinstance(r.get("config"), dict) and ("resumed_from" not in r or _is_step(r["resumed_from"])),
    "switch": lambda r: _is_step(r.get("step")) and isinstance(r.get("layer"), str)
    and (r["v"] == 1 or r.get("gemm") in GEMMS) and r.get("from") in ("fp8", "bf16") and r.get("to") in ("fp8", "bf16") and isinstance(r.get("reason"), str)
    and isinstance(r.get("signals", {}), dict),
    "stats": lambda r: _is_step(r.get("step")) and isinstance(r.get("layers"), dict)
    and all(isinstance(k, str) and isinstance(v, dict) for k, v in r["layers"].items()),
    "run_end": lambda r: _is_step(r.get("step")),
    "rollout_switch": lambda r: _is_step(r.get("step")) and isinstance(r.get("layer"), str)
    and r.get("from") in ("fp8", "bf16") and r.get("to") in ("fp8", "bf16") and isinstance(r.get("reason"), str)
    and _is_step(r.get("map_version")) and isinstance(r.get("signals", {}), dict),
}


def _readable(v) -> bool:
    return type(v) is int and v in READABLE_VERSIONS   # not True, not 1.0: a version is an integer


def parse_line(raw: bytes | str) -> dict | None:
    """One log line as a record, or None if it is not a JSON object of a known kind and schema version with
    every field its kind needs, of the right type (a step an integer in [-1, 2**53)). A record that fails is
    skipped and counted by the readers, never fatal."""
    try:
        rec = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not (isinstance(rec, dict) and _readable(rec.get("v")) and rec.get("kind") in KINDS):
        return None
    if not isinstance(rec.get("run"), str) or not _is_number(rec.get("time")):
        return None
    return rec if _FIELDS[rec["kind"]](rec) else None


def foreign_version(raw: bytes | str):
    """The schema version ``"v"`` of a JSON object line that is not ours to read (another version), else None."""
    try:
        rec = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    v = rec.get("v") if isinstance(rec, dict) else None
    return v if v is not None and not _readable(v) and isinstance(v, (int, float, str)) else None


def iter_records(path: str | Path, skipped: list[str] | None = None) -> Iterator[dict]:
    """Stream the valid records of one log (memory does not grow with the file). Each line that does not
    parse is skipped and, if ``skipped`` is given, appended to it as ``"path:lineno: text"``."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            rec = parse_line(raw)
            if rec is not None:
                yield rec
            elif skipped is not None:
                skipped.append(f"{path}:{lineno}: {raw[:80]!r}")


def read_log(path: str | Path) -> ReadResult:
    skipped: list[str] = []
    records = list(iter_records(path, skipped))
    return ReadResult(records, len(skipped), skipped[:3])
