"""Metric loggers behind one interface. The JSONL file logger is always on (``metrics.jsonl``, one object per
logged step, always with ``"step"``); others (W&B) sit beside it. Only rank 0 logs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol


class MetricLogger(Protocol):
    def log(self, step: int, metrics: dict) -> None: ...
    def close(self) -> None: ...


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


class JsonlLogger:
    def __init__(self, path: str | Path):
        self._fh = open(path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row, allow_nan=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class MultiLogger:
    """Fans out to several loggers; a no-op on ranks other than 0."""

    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = loggers

    def log(self, step: int, metrics: dict) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
