"""Metric loggers behind one interface. The JSONL file logger is always on (``metrics.jsonl``, one object per
logged step, always with ``"step"``); others (W&B) sit beside it. Only rank 0 logs."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Protocol

from precisionrt.config import Checked, ConfigError, LayerPattern, Name, Range, flatten
from precisionrt.files import open_append
from precisionrt.observe.events import EVENTS_FILE, GEMMS, json_safe

log = logging.getLogger(__name__)


class MetricLogger(Protocol):
    def log(self, step: int, metrics: dict) -> None: ...
    def close(self) -> None: ...


class JsonlLogger:
    def __init__(self, path: str | Path):
        self._fh = open_append(path)   # a regular file only: a FIFO would block, a symlink write elsewhere

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: json_safe(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row, allow_nan=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


SWITCH_COLUMNS = ["step", "layer", "gemm", "from", "to", "reason", "underflow", "overflow", "headroom", "quant_error",
                  "grad_rel_err"]


@dataclass
class WandbConfig(Checked):
    """W&B beside the JSONL file. WANDB_MODE, WANDB_DIR and WANDB_PROJECT win over ``mode``, the run
    directory and ``project``; without them the run is offline, in ``<run dir>/wandb``."""

    enabled: bool = False
    project: Name = "precisionrt"
    mode: Literal['offline', 'online', 'disabled'] = "offline"
    timeline_every: Annotated[int, Range(ge=1, le=10**9)] = 10
    """Logged steps between refreshes of the precision-timeline image."""
    layer_panels: list[LayerPattern] | None = None
    """fnmatch patterns of the layers that get per-layer panels (``precision/<layer>/<signal>``). None: every
    layer of a model with at most ``MAX_DEFAULT_PANEL_LAYERS``, none beyond (a 500-layer model would make
    5,000 series); the aggregates (worst layer per signal, layers in BF16, FP8 FLOP share) are always logged."""


MAX_DEFAULT_PANEL_LAYERS = 64


def panel_layers(cfg: WandbConfig, layers: list[str]) -> set[str]:
    """The layers whose per-layer metrics go to W&B."""
    if cfg.layer_panels is None:
        return set(layers) if len(layers) <= MAX_DEFAULT_PANEL_LAYERS else set()
    for pattern in cfg.layer_panels:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in layers):
            raise ConfigError(f"wandb.layer_panels pattern {pattern!r} matches no managed layer; e.g. {layers[:3]}")
    return {n for n in layers if any(fnmatch.fnmatchcase(n, p) for p in cfg.layer_panels)}


class WandbLogger:
    """Per-layer panels come in as ``precision/<layer>/...`` metrics; switches go to an incremental table;
    the layer x step timeline is refreshed as an image. A failure to reach W&B is reported once and turns the
    logger off: training never stops for it."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, run_name: str, config: dict, layers: list[str] = ()):
        """``layers``: the managed layer names, of which ``cfg.layer_panels`` picks those with panels."""
        self._all_layers, self._panels = set(layers), panel_layers(cfg, list(layers))
        try:
            import wandb
        except ImportError:
            raise ImportError("wandb.enabled needs wandb: pip install -e '.[wandb]'") from None
        self.wandb, self.cfg, self.run_dir = wandb, cfg, Path(run_dir)
        self.error: str | None = None
        self._logged, self._last_step = 0, 0
        kwargs = {"name": run_name, "config": config, "reinit": "finish_previous"}
        if "WANDB_MODE" not in os.environ:
            kwargs["mode"] = cfg.mode
        if "WANDB_DIR" not in os.environ:
            kwargs["dir"] = str(self.run_dir)
        if "WANDB_PROJECT" not in os.environ:
            kwargs["project"] = cfg.project

        def start():
            self.run = wandb.init(**kwargs)
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
            self.switches = wandb.Table(columns=SWITCH_COLUMNS, log_mode="INCREMENTAL")
        self._guard("init", start)

    def _guard(self, what: str, fn) -> None:
        if self.error is not None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported once below, and the run goes on without W&B
            self.error = f"{what}: {type(e).__name__}: {e}"
            log.error("precisionrt: W&B logging failed and is off for the rest of the run (%s)", self.error)

    def _has_matplotlib(self) -> bool:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            if not getattr(self, "_warned_matplotlib", False):
                log.warning("precisionrt: no matplotlib, so no precision timeline image in W&B "
                            "(pip install -e '.[analysis]')")
                self._warned_matplotlib = True
            return False
        return True

    def log(self, step: int, metrics: dict) -> None:
        """Numbers as scalars; a list of numbers (e.g. per-sample staleness) as a histogram; a dict of them (e.g.
        the mismatch by precision-map version) as one scalar per key path (``k/3/k3_kl``)."""
        row = {"step": step}
        for k, v in flatten(metrics, "/").items():
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "precision" and parts[1] in self._all_layers \
                    and parts[1] not in self._panels:
                continue   # a per-layer series of a layer without panels
            if isinstance(v, (int, float)) and v is not None:
                row[k] = v
            elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                row[k] = self.wandb.Histogram(v)
        self._guard("log", lambda: self.run.log(row))
        self._last_step = step
        self._logged += 1
        if self._logged % self.cfg.timeline_every == 0:
            self.log_timeline(step)

    def log_switches(self, step: int, events: list[dict]) -> None:
        if not events:
            return

        def add():
            for e in events:
                sig = e.get("signals", {})
                self.switches.add_data(e["step"], e["layer"], e["gemm"], e["from"], e["to"], e["reason"],
                                       *(sig.get(k) for k in SWITCH_COLUMNS[6:]))
            self.run.log({"step": step, "precision/switches": self.switches})
        self._guard("switch table", add)

    def log_timeline(self, step: int) -> None:
        from precisionrt.observe import analysis

        log = self.run_dir / EVENTS_FILE

        def image():
            png = analysis.timeline(log, self.run_dir / "precision_timeline.png")
            self.run.log({"step": step, "precision/timeline": self.wandb.Image(str(png))})
        if log.exists() and self._has_matplotlib():
            self._guard("timeline", image)

    def log_precision_table(self, step: int, max_rows: int = 100_000) -> None:
        """Long format (step, layer, precision, is_fp8 and each GEMM's precision) at every check, for custom charts:
        a layer whose GEMMs differ reads ``mixed``, is_fp8 the share of its GEMMs in FP8."""
        from precisionrt.observe import analysis

        log = self.run_dir / EVENTS_FILE

        def table():
            rows = []
            for r in analysis.export_rows([log], analysis.Skipped()):
                if r["kind"] == "stats" and len(rows) < max_rows:
                    gemms = [r[f"{g}_precision"] for g in GEMMS]
                    rows.append([r["step"], r["layer"], r["precision"], gemms.count("fp8") / len(GEMMS), *gemms])
            t = self.wandb.Table(columns=["step", "layer", "precision", "is_fp8", *GEMMS], data=rows)
            self.run.log({"step": step, "precision/layer_steps": t})
        if log.exists():
            self._guard("precision table", table)

    def close(self) -> None:
        self.log_timeline(self._last_step)
        self.log_precision_table(self._last_step)
        self._guard("finish", lambda: self.run.finish())


class MultiLogger:
    """Fans out to several loggers; a no-op on ranks other than 0."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def log(self, step: int, metrics: dict) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def log_switches(self, step: int, events: list[dict]) -> None:
        for logger in self.loggers:
            if hasattr(logger, "log_switches"):
                logger.log_switches(step, events)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
