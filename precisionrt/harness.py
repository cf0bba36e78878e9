"""What the training commands (``precisionrt.train``, ``rl.train``) share around their loops."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from precisionrt.config import ConfigError
from precisionrt.rundir import truncate_metrics

log = logging.getLogger(__name__)


class TooManySkippedSteps(RuntimeError):
    """Most optimizer steps were skipped for nonfinite gradients: the run is not training."""


def check_skipped(skipped: int, done: int, max_fraction: float, minimum: int = 5) -> None:
    """Raise ``TooManySkippedSteps`` when ``skipped`` of the ``done`` steps of this run segment exceed
    ``max_fraction`` (and number at least ``minimum``, so that one early NaN does not end a run)."""
    if skipped >= minimum and skipped > max_fraction * done:
        raise TooManySkippedSteps(
            f"{skipped} of {done} optimizer steps were skipped for nonfinite gradients (more than "
            f"train.max_skipped_fraction = {max_fraction}): the run is training on nothing. Lower train.lr, "
            "check the data, or look at the switch log for the layer where NaN/Inf entered")


def holds_run(run_dir: str, resume: bool) -> bool:
    """True when a resume goes into a directory that already holds a run (its ``config.json`` exists): a
    missing checkpoint is then an error (``require_checkpoint``), not a silent fresh start."""
    return bool(run_dir) and resume and (Path(run_dir) / "config.json").exists()


def require_checkpoint(found, held_a_run: bool, run_dir: Path) -> None:
    if found is None and held_a_run:
        raise ConfigError(f"train.resume: {str(run_dir)!r} holds a run but no checkpoint to resume from; "
                          "choose another run.dir to start afresh")


def finished_summary(run_dir: Path, step: int, end: int, announce: bool) -> dict | None:
    """A run whose checkpoint is at or past ``end`` is finished, and resuming it changes nothing: its
    ``summary.json`` (or the least that describes it). None when the run has steps left."""
    if step < end:
        return None
    if announce:
        log.info("%s already reached step %d (the run ends at %d): nothing to do; raise train.steps to "
                 "continue it", run_dir, step, end)
    done = run_dir / "summary.json"
    return json.loads(done.read_text()) if done.exists() else {"steps": step, "resumed_from": step}


def drop_replayed_metrics(run_dir: Path, step: int) -> None:
    """Before a resumed run logs again from ``step``: the rows an earlier segment logged after it go."""
    dropped = truncate_metrics(run_dir / "metrics.jsonl", step)
    if dropped:
        log.info("%d metrics row(s) after step %d dropped: they are logged again", dropped, step)


def check_model_fits(model, saved: dict, source: str) -> None:
    """Refuse a checkpoint whose weights do not fit ``model`` (another model size or layout), naming the
    first parameter that differs and how, before anything is loaded or written."""
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unknown = [k for k in saved if k not in own]
    if missing or unknown:
        raise ConfigError(f"train.resume: {source} does not fit this model: parameters missing from it "
                          f"{missing[:2]}, unknown to the model {unknown[:2]}")
    for key, value in own.items():
        theirs = saved[key]
        if hasattr(theirs, "shape") and tuple(theirs.shape) != tuple(value.shape):
            raise ConfigError(f"train.resume: {source} holds {key} of shape {tuple(theirs.shape)}, this model "
                              f"{tuple(value.shape)}: was it written with other model.* settings?")
