"""What a resume may change, and the record of each run segment.

A resumed run continues the same run: the keys that say what the run *is* (precision mode, seed, batch size,
model, data, policy thresholds, RL algorithm, ...) must stay as they were, or the curves and the switch log
would silently mix two experiments under one name. Only the keys in ``FREE_TO_CHANGE`` (how long, how often
to log and checkpoint, where to report) may differ; any other change is refused, naming each key with its old
and new value, unless ``train.resume_override`` names it.

``config.json`` stays the configuration the run started with. Each resumed segment appends one line to
``segments.jsonl`` in the run directory: the step it resumed from, its whole configuration and what changed.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
from pathlib import Path

from precisionrt.config import StartupError, flatten
from precisionrt.files import open_append, read_json, read_text

log = logging.getLogger(__name__)

SEGMENTS_FILE = "segments.jsonl"
RESOLVED_KEY = "resolved_paths"
"""The key of ``config.json`` with the absolute paths the run uses; not a configuration key."""

FREE_TO_CHANGE = (
    "run.*", "wandb.*", "train.steps", "train.stop_at_step", "train.resume", "train.resume_override",
    "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "train.eval_every",
    "train.max_skipped_fraction", "precision.control_file", "precision.fused_kernels",
    "executor.kind", "executor.num_workers",
)


def previous_config(run_dir: Path) -> dict:
    """The configuration of the run's latest segment: the last readable line of ``segments.jsonl``, else
    ``config.json``. A run that has checkpoints always wrote ``config.json``: one missing, unreadable or not a
    JSON object is a ``StartupError`` (the check of what a resume changes is never skipped)."""
    where = run_dir / "config.json"
    try:
        config = read_json(where, "the run's configuration", limit=64 << 20)
    except FileNotFoundError:
        raise StartupError(f"train.resume: {where} is missing, so what this resume changes cannot be checked; "
                           "restore it (each checkpoint carries the run's configuration under \"config\")") from None
    except (OSError, ValueError) as e:
        raise StartupError(f"train.resume: {where} cannot be read ({e}); restore it (each checkpoint carries the "
                           "run's configuration under \"config\")") from None
    if not isinstance(config, dict) or not config:
        raise StartupError(f"train.resume: {where} is not the run's configuration (an empty or non-object file); "
                           "restore it (each checkpoint carries the run's configuration under \"config\")")
    segments = run_dir / SEGMENTS_FILE
    if os.path.lexists(segments):
        try:
            lines = read_text(segments, "the run's segments", limit=1 << 30, errors="replace").splitlines()
        except (OSError, ValueError) as e:
            raise StartupError(f"train.resume: {segments} cannot be read ({e})") from None
        for line in reversed(lines):
            try:
                return json.loads(line)["config"]
            except (ValueError, KeyError, TypeError):
                continue   # a torn last line
    return {k: v for k, v in config.items() if k != RESOLVED_KEY}


def check_changes(before: dict, after: dict, overrides: list[str]) -> dict[str, list]:
    """The keys whose value differs between ``before`` and ``after`` (``{key: [old, new]}``); raises
    ``StartupError`` naming those that change the run's meaning and that ``overrides`` does not name."""
    old, new = flatten(before), flatten(after)
    changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    refused = {k: v for k, v in changed.items()
               if not any(fnmatch.fnmatchcase(k, p) for p in (*FREE_TO_CHANGE, *overrides))}
    if refused:
        listed = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in refused.items())
        raise StartupError(f"train.resume: this would change what the run is: {listed}. Resume with the run's own "
                           f"values, choose another run.dir, or name the keys in train.resume_override "
                           f"(e.g. {json.dumps(list(refused)[:2])})")
    return changed


def record_segment(run_dir: Path, resumed_from: int, config: dict, changed: dict) -> None:
    """Append this segment's line to ``segments.jsonl`` (durably: a crash right after still shows it)."""
    line = json.dumps({"resumed_from": resumed_from, "time": time.time(), "changed": changed, "config": config},
                      default=str)
    with open_append(run_dir / SEGMENTS_FILE) as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if changed:
        log.info("resumed with changed keys: %s", ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changed.items()))
