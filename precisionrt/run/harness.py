"""What the training commands (``precisionrt.train``, ``rl.train``) share around their loops: opening the run
(directory, resume checks, checkpoint, loggers: ``open_run``) and the skipped-step guard."""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from precisionrt.config import ConfigError, StartupError, to_dict
from precisionrt.files import read_json, read_text
from precisionrt.models.hf.save import MARKER, to_hf
from precisionrt.run import lock
from precisionrt.run.checkpoint import load_latest_checkpoint
from precisionrt.observe.events import EVENTS_FILE
from precisionrt.observe.loggers import JsonlLogger, MultiLogger, WandbLogger
from precisionrt.run.resume import RESOLVED_KEY, check_changes, previous_config, record_segment
from precisionrt.run.rundir import prepare_run_dir, resolve_run_dir, truncate_metrics, write_json

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


def finished_summary(cfg, model, run_dir: Path, found: tuple[int, dict], end: int, is_main: bool) -> dict | None:
    """A run whose checkpoint is at or past ``end`` is finished: its ``summary.json``, resuming it changes
    nothing. A run that reached ``end`` but whose last step failed (the Hugging Face export, or the summary:
    a full disk) is finished now: the export is written from the final checkpoint's weights (every rank), and
    a lost summary is rebuilt from ``metrics.jsonl`` and the checkpoint. None when the run has steps left."""
    step, state = found
    if step < end:
        return None
    summary_path, export = run_dir / "summary.json", run_dir / "hf" if cfg.train.export_hf else None
    summary = _read_summary(summary_path)
    exported = export is None or (export / MARKER).is_file()
    if summary is not None and exported:
        if is_main:
            log.info("%s already reached step %d (the run ends at %d): nothing to do; raise train.steps to "
                     "continue it", run_dir, step, end)
        return summary
    missing = [what for what, done in (("summary.json", summary is not None), ("the export", exported)) if not done]
    if is_main:
        log.info("%s reached step %d but its %s failed: finishing it now", run_dir, step, " and ".join(missing))
    if summary is None:
        summary = _rebuilt_summary(run_dir, step, state)
    if not exported:
        model.load_state_dict(state["model"])
        summary["hf_export"] = str(to_hf(model, export, tokenizer_dir=cfg.model.tokenizer_path or None) or export)
    if is_main:
        write_json(summary_path, summary)
    return summary


def _read_summary(path: Path) -> dict | None:
    try:
        summary = read_json(path, "the run's summary", limit=256 << 20)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("warning: %s cannot be read (%s); it is written again", path, e)
        return None
    return summary if isinstance(summary, dict) else None


def _rebuilt_summary(run_dir: Path, step: int, state: dict) -> dict:
    """What is left of a lost summary: the last logged value of each metric, and the checkpoint's history."""
    last = {}
    try:
        lines = read_text(run_dir / "metrics.jsonl", "metrics.jsonl", limit=1 << 40, errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue   # a torn line: its metrics are logged again in the next row
        if isinstance(row, dict):
            last.update(row)
    history = state.get("history") or {"switches": state.get("rl", {}).get("switches", [])}
    return {"steps": step, "resumed_from": step, "rebuilt": "summary.json was lost; rebuilt from metrics.jsonl "
            "and the final checkpoint", "final_train_loss": last.get("train/loss"),
            "final_eval_loss": last.get("eval/loss"), "reward_final": last.get("eval/reward"), **history}


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


@dataclass
class OpenedRun:
    run_dir: Path
    checkpoint: tuple[int, dict] | None
    """(step, this rank's state) of the checkpoint a resumed run continues from; None for a fresh run."""
    finished: dict | None
    """A finished run's summary: resuming it changes nothing, and the command returns this."""
    logger: MultiLogger | None
    written: Callable[[], list[Path]] = list
    """What this launch has added to the run directory so far (a fresh run's, on rank 0; else nothing)."""

    @contextmanager
    def starting(self):
        """Around what a command does between opening the run and its first step. A failure there takes back
        what this launch wrote (for a fresh run: its files, and the directory if it made it), so that the
        corrected rerun into the same ``run.dir`` is not refused as "already holds a run"."""
        try:
            yield
        except BaseException:
            lock.release(self.run_dir)
            if self.logger is not None:
                self.logger.close()
            removed = self.written()
            for path in removed:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            if removed:
                log.info("start-up failed: removed %s", ", ".join(str(p) for p in removed))
            raise


def _new_entries(run_dir: Path, fresh: bool, is_main: bool) -> Callable[[], list[Path]]:
    """What a fresh launch adds to ``run_dir``, measured against what was there before it (a run directory
    may be made beforehand, e.g. holding the operator control file)."""
    if not (fresh and is_main):
        return list
    existed = run_dir.is_dir()
    before = set(os.listdir(run_dir)) if existed else set()

    def written() -> list[Path]:
        if not run_dir.is_dir():
            return []
        if not existed:
            return [run_dir]
        return sorted(run_dir / n for n in set(os.listdir(run_dir)) - before)
    return written


def resolved_paths(cfg, run_dir: Path) -> dict:
    """The absolute paths the run reads and writes, for ``config.json``."""
    root = run_dir.resolve()
    control = cfg.precision.control_file
    return {"run_dir": str(root), "checkpoints": str(root / "checkpoints"),
            "control_file": str(root / control) if control else None, "switch_log": str(root / EVENTS_FILE)}


def open_run(cfg, model, layers: list[str], end: int, is_main: bool = True, shard: str | None = None,
             layout: dict | None = None, group=None) -> OpenedRun:
    """What both commands do before their first step: claim ``run.dir`` (or reopen it with ``train.resume``),
    find the checkpoint to resume from and refuse what cannot be resumed (a held run without a checkpoint,
    another parallel layout, another model, a change of what the run is) before anything is written; then
    drop the metrics rows a resumed run logs again, write ``config.json`` (a fresh run) or the segment's line
    of ``segments.jsonl`` (a resumed one) and open the loggers (rank 0)."""
    held_a_run = holds_run(cfg.run.dir, cfg.train.resume)
    path = resolve_run_dir(cfg.run)
    written = _new_entries(path, fresh=not held_a_run, is_main=is_main)
    run_dir = prepare_run_dir(cfg.run, resume=cfg.train.resume, is_main=is_main, path=path)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # rank 0's directory for every rank (a default name carries a timestamp that may differ between ranks);
        # the broadcast also waits until rank 0 has checked and claimed it
        shared = [str(run_dir)]
        torch.distributed.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    found = None
    with OpenedRun(run_dir, None, None, None, written).starting():   # a refusal takes back the claim
        if cfg.train.resume:
            try:
                found = load_latest_checkpoint(run_dir, shard, layout, group=group)
            except ValueError as e:   # another parallel layout: a configuration problem, named as one
                raise ConfigError(f"train.resume: {e}") from None
            except RuntimeError as e:   # every checkpoint damaged, refused by weights_only, or not its step
                raise StartupError(f"train.resume: {e}") from None
        require_checkpoint(found, held_a_run, run_dir)
        changed = None
        if found is not None:
            check_model_fits(model, found[1]["model"], f"the step-{found[0]} checkpoint in {run_dir}")
            # what the run was: its latest segment's configuration, and the one its checkpoint carries
            changed = check_changes(previous_config(run_dir), to_dict(cfg), cfg.train.resume_override)
            if isinstance(found[1].get("config"), dict):
                check_changes(found[1]["config"], to_dict(cfg), cfg.train.resume_override)
            if (done := finished_summary(cfg, model, run_dir, found, end, is_main)) is not None:
                lock.release(run_dir)
                return OpenedRun(run_dir, found, done, None)
    if found is not None and is_main:
        log.info("resumed from step %d in %s", found[0], run_dir)
        drop_replayed_metrics(run_dir, found[0])
        record_segment(run_dir, found[0], to_dict(cfg), changed)
    logger = MultiLogger([JsonlLogger(run_dir / "metrics.jsonl")] if is_main else [])
    opened = OpenedRun(run_dir, found, None, logger, written)
    if is_main and found is None:   # only once the checkpoint is known to fit this configuration
        write_json(run_dir / "config.json", {**to_dict(cfg), RESOLVED_KEY: resolved_paths(cfg, run_dir)})
    if is_main and cfg.wandb.enabled:
        with opened.starting():
            logger.loggers.append(WandbLogger(cfg.wandb, run_dir, run_dir.name, to_dict(cfg), layers=layers))
    return opened
