"""The speed plan: FP8 only where it is faster, GEMM by GEMM, from a table measured on this device.

``python -m precisionrt.speed`` (``precisionrt/speed.py``) times a linear layer's forward and backward at every
distinct shape of the configured model, once for each of the 8 assignments of FP8/BF16 to its three GEMMs (fprop,
dgrad, wgrad), as the layer runs them: quantization, statistics and layout copies included, shared operands
quantized once. It writes a JSON table (``TABLE_VERSION``) with the device's name, torch's version and the
medians. ``precision.plan = "speed"`` with ``precision.speed_table = PATH`` then runs, for each layer, the
assignment with the smallest measured time, provided it beats all-BF16 by ``precision.speed_margin``; every GEMM
that assignment leaves in BF16 is pinned there (reason ``"speed"`` in the log's layer table) and the stability
policy acts on the rest. A table measured on another device, or one without a shape the model has, is refused
by name: a missing shape is an error, not a guess.

Why whole assignments rather than one number per GEMM: the layer quantizes an operand once for every FP8 GEMM
that reads it (``x`` for fprop and wgrad, ``W`` for fprop and dgrad, ``dY`` for dgrad and wgrad), so a GEMM's
cost in FP8 depends on its neighbours; measuring the eight combinations counts each quantization exactly as
often as the layer runs it.
"""

from __future__ import annotations

import itertools
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from precisionrt.config import ConfigError
from precisionrt.observe.events import GEMMS

TABLE_VERSION = 1
ASSIGNMENTS: list[tuple[str, str, str]] = list(itertools.product(("fp8", "bf16"), repeat=3))
"""Every (fprop, dgrad, wgrad) assignment, all-FP8 first."""


def assignment_key(assignment: tuple[str, ...]) -> str:
    """``("fp8", "bf16", "fp8")`` -> ``"fprop=fp8,dgrad=bf16,wgrad=fp8"`` (the table's keys)."""
    return ",".join(f"{g}={p}" for g, p in zip(GEMMS, assignment))


def device_name(device: torch.device | str) -> str:
    """What a table is valid for: the GPU's name, or the CPU's model (their speeds differ by orders of
    magnitude between machines of one kind)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu: {model}"


@dataclass
class LayerPlan:
    layer: str
    shape: tuple[int, int]
    precisions: dict[str, str]
    """The GEMMs' precisions the plan runs (BF16 ones are pinned)."""
    ms: dict[str, float]
    """Measured time of this layer's plan, all-BF16 and all-FP8 (fwd + bwd of one forward's tokens)."""


@dataclass
class SpeedPlan:
    table: str
    device: str
    tokens: int
    layers: dict[str, LayerPlan] = field(default_factory=dict)

    def pins(self) -> dict[tuple[str, str], str]:
        """The GEMMs the plan keeps in BF16: ``{(layer, gemm): "bf16"}``."""
        return {(n, g): "bf16" for n, lp in self.layers.items() for g, p in lp.precisions.items() if p == "bf16"}

    def predicted(self) -> dict[str, float]:
        """Predicted GEMM time per forward+backward of the whole model, in milliseconds: the plan, all-BF16,
        all-FP8 (the managed layers only)."""
        return {k: sum(lp.ms[k] for lp in self.layers.values()) for k in ("plan", "bf16", "fp8")}

    def summary(self) -> dict:
        gemms = [p for lp in self.layers.values() for p in lp.precisions.values()]
        return {"table": self.table, "device": self.device, "tokens": self.tokens,
                "predicted_ms": self.predicted(), "fp8_gemms": gemms.count("fp8"), "bf16_gemms": gemms.count("bf16")}

    def line(self) -> str:
        t = self.predicted()
        s = self.summary()
        return (f"speed plan ({self.table}): {s['fp8_gemms']} GEMMs in FP8, {s['bf16_gemms']} pinned BF16 for speed; "
                f"predicted GEMM time {t['plan']:.3f} ms per step vs {t['bf16']:.3f} all-BF16, {t['fp8']:.3f} all-FP8 "
                f"({self.tokens} tokens per forward, {self.device})")


def load_table(path: str | Path) -> dict:
    """A speed table, checked for its shape; errors name the file and the field."""
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"precision.speed_table: {path} does not exist (make one with "
                          "python -m precisionrt.speed --config FILE --out TABLE.json)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"precision.speed_table: {path} cannot be read as JSON ({e})") from None
    if not isinstance(table, dict) or table.get("version") != TABLE_VERSION:
        raise ConfigError(f"precision.speed_table: {path} is not a speed table of version {TABLE_VERSION}")
    for i, entry in enumerate(table.get("shapes") or []):
        ms = entry.get("ms") if isinstance(entry, dict) else None
        if not (isinstance(ms, dict) and all(isinstance(ms.get(assignment_key(a)), (int, float)) and ms[assignment_key(a)] > 0
                                             for a in ASSIGNMENTS)
                and isinstance(entry.get("k"), int) and isinstance(entry.get("n"), int)):
            raise ConfigError(f"precision.speed_table: {path}: shapes[{i}] needs integer k, n and a positive time "
                              f"for each of the 8 GEMM assignments")
    if not table.get("shapes"):
        raise ConfigError(f"precision.speed_table: {path} holds no shapes")
    return table


def make_plan(path: str | Path, layers: dict[str, tuple[int, int]], fp8_capable: dict[str, bool],
              device: torch.device | str, margin: float) -> SpeedPlan:
    """The plan for ``layers`` (name -> (K, N) of one shard) from the table at ``path``, which must have been
    measured on ``device``'s kind of device and hold every shape."""
    table = load_table(path)
    here = device_name(device)
    if table.get("device") != here:
        raise ConfigError(f"precision.speed_table: {path} was measured on {table.get('device')!r}, this run is on "
                          f"{here!r}: measure a table here (python -m precisionrt.speed)")
    by_shape = {(e["k"], e["n"]): e["ms"] for e in table["shapes"]}
    plan = SpeedPlan(str(path), here, int(table.get("tokens", 0)))
    for name, shape in layers.items():
        if not fp8_capable[name]:
            continue
        ms = by_shape.get(tuple(shape))
        if ms is None:
            raise ConfigError(f"precision.speed_table: {path} has no entry for layer {name} (K={shape[0]}, "
                              f"N={shape[1]}); its shapes are {sorted(by_shape)[:6]}: measure this model's")
        bf16, fp8 = ms[assignment_key(("bf16",) * 3)], ms[assignment_key(("fp8",) * 3)]
        best = min(ASSIGNMENTS, key=lambda a: ms[assignment_key(a)])
        if ms[assignment_key(best)] > bf16 * (1 - margin):
            best = ("bf16",) * 3
        plan.layers[name] = LayerPlan(name, tuple(shape), dict(zip(GEMMS, best)),
                                      {"plan": ms[assignment_key(best)], "bf16": bf16, "fp8": fp8})
    return plan
