"""Offline analysis of switch logs (contract C4), for the ``precisionrt-log`` command.

Streams: memory grows with the number of layers and switches, never with the number of ``stats`` records, so
a million-record log summarises on a laptop. Imports neither torch nor megatron. Several files (several
ranks, or a run and its resumed continuation) merge by run id; a resumed segment (``run_start`` with
``resumed_from = S``) supersedes what an earlier segment logged after step S. Lines that do not parse are
skipped and counted, never fatal.
"""

from __future__ import annotations

import fnmatch

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from precisionrt.observe.events import (EVENTS_FILE, GEMMS, READABLE_VERSIONS, STATS_PREFIXES, foreign_version, gemm_of,
                                       layer_precision, parse_line)

__all__ = ["RunState", "Skipped", "collect", "compare", "dumps", "export_rows", "log_paths", "main_run", "stream",
           "summarize", "summarize_run", "timeline"]

_STEP = re.compile(rb'"step":(-?\d+)')


@dataclass
class Skipped:
    """The unreadable lines of the logs read (and, to say so when nothing was readable, the readable records)."""

    count: int = 0
    examples: list = field(default_factory=list)
    records: int = 0
    versions: Counter = field(default_factory=Counter)
    """Skipped lines by the schema version they carry, when it is not the one this reader knows."""

    def add(self, where: str, raw: bytes) -> None:
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(f"{where}: {raw[:80]!r}")
        if (v := foreign_version(raw)) is not None:
            self.versions[v] += 1

    def explain(self) -> str:
        """``"N unreadable line(s) skipped"``, naming the schema versions that made them unreadable."""
        text = f"{self.count} unreadable line(s) skipped"
        if self.versions:
            listed = ", ".join(f"{v!r} ({n} line(s))" for v, n in self.versions.most_common())
            text += f"; records of schema version {listed}: this precisionrt reads versions {list(READABLE_VERSIONS)}"
        return text


def log_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files named directly, or the switch log inside a run directory."""
    out = []
    for p in map(Path, paths):
        f = p / EVENTS_FILE if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"no switch log at {f}")
        out.append(f)
    return out


def stream(path: Path, skipped: Skipped, want_stats: bool = False) -> Iterator[dict]:
    """Records of one log. Our own stats lines are only checked for completeness and their step read, unless
    ``want_stats``: full parsing is the cost of a stats-heavy log."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not want_stats and raw.startswith(STATS_PREFIXES):
                m = _STEP.search(raw, 0, 120)
                if raw.rstrip().endswith(b"}") and m:
                    skipped.records += 1
                    yield {"kind": "stats", "step": int(m.group(1))}
                else:
                    skipped.add(f"{path}:{lineno}", raw)
                continue
            rec = parse_line(raw)
            if rec is None:
                if raw.strip():
                    skipped.add(f"{path}:{lineno}", raw)
                continue
            skipped.records += 1
            yield rec


@dataclass
class RunState:
    run: str
    layers: dict = field(default_factory=dict)
    """Name -> {"flops": F, "initial": {gemm: P}} (F: all three GEMMs' FLOPs per token)."""
    switches: dict = field(default_factory=dict)
    """(step, layer, gemm, from, to, reason) -> None, in log order: one per GEMM (a schema-1 record moved all
    three). A dict as an ordered set: the same switch logged by several ranks counts once, found in O(1)."""
    rollout_switches: dict = field(default_factory=dict)
    """(step, layer, from, to, reason, map_version) -> None: the RL rollout engine's side"""
    first_step: int | None = None
    last_step: int = 0
    ended: bool = False
    files: set = field(default_factory=set)

    def resume_at(self, step: int) -> None:
        self.switches = {s: None for s in self.switches if s[0] <= step}
        self.rollout_switches = {s: None for s in self.rollout_switches if s[0] <= step}
        self.last_step = min(self.last_step, step)
        self.ended = False


def collect(paths: Iterable[str | Path]) -> tuple[dict[str, RunState], Skipped]:
    runs: dict[str, RunState] = {}
    skipped = Skipped()
    for path in log_paths(paths):
        current: RunState | None = None
        for rec in stream(path, skipped):
            kind = rec["kind"]
            if kind == "run_start":
                current = runs.setdefault(rec["run"], RunState(rec["run"]))
                current.files.add(str(path))
                for layer in rec.get("layers", []):
                    current.layers.setdefault(layer["name"], {"flops": layer.get("gemm_flops_per_token", 0),
                                                              "initial": _initial(layer)})
                if rec.get("resumed_from") is not None:
                    current.resume_at(int(rec["resumed_from"]))
                continue
            if current is None:
                current = runs.setdefault("?", RunState("?"))
            step = int(rec.get("step", 0))
            current.first_step = step if current.first_step is None else min(current.first_step, step)
            current.last_step = max(current.last_step, step)
            if kind == "switch":
                for gemm in gemm_of(rec):
                    sw = (step, rec["layer"], gemm, rec["from"], rec["to"], rec["reason"])
                    current.switches[sw] = None   # the same decision logged by several ranks: once
                current.layers.setdefault(rec["layer"], {"flops": 0, "initial": dict.fromkeys(GEMMS, rec["from"])})
            elif kind == "rollout_switch":
                sw = (step, rec["layer"], rec["from"], rec["to"], rec["reason"], rec["map_version"])
                current.rollout_switches[sw] = None
            elif kind == "run_end":
                current.ended = True
    return runs, skipped


def _initial(layer: dict) -> dict[str, str]:
    """A run_start layer entry's GEMM precisions (schema 2), or its one precision for all three (schema 1)."""
    gemms = layer.get("gemms")
    if isinstance(gemms, dict) and all(gemms.get(g) in ("fp8", "bf16") for g in GEMMS):
        return {g: gemms[g] for g in GEMMS}
    precision = layer.get("precision")
    return dict.fromkeys(GEMMS, precision if precision in ("fp8", "bf16") else "fp8")


def _decisions(switches: list) -> list[tuple]:
    """GEMM switches grouped into decisions: one per (step, layer, to, reason), e.g. a whole-layer promotion is
    one decision of three GEMM switches; ``(step, layer, to, reason, gemms)``."""
    out: dict[tuple, list] = {}
    for step, layer, gemm, _, to, reason in sorted(switches):
        out.setdefault((step, layer, to, reason), []).append(gemm)
    return [(*k, tuple(v)) for k, v in out.items()]


def summarize_run(state: RunState) -> dict:
    """Per layer: steps in FP8 (per GEMM, and their mean), promotions/demotions by reason (a decision that moves
    several GEMMs of a step counts once), first promotion; per run: FP8 FLOP share (each GEMM a third of its
    layer's FLOPs)."""
    steps = max(state.last_step, 0)
    by_layer: dict[str, list] = {n: [] for n in state.layers}
    for sw in sorted(state.switches):
        by_layer.setdefault(sw[1], []).append(sw)
    layers, fp8_flops, all_flops = {}, 0.0, 0.0
    for name, switches in by_layer.items():
        info = state.layers.get(name, {"flops": 0, "initial": dict.fromkeys(GEMMS, "fp8")})
        gemms = {}
        for gemm in GEMMS:
            precision, since, fp8_steps = info["initial"][gemm], 0, 0
            for step, _, g, frm, to, _ in switches:
                if g != gemm:
                    continue
                if precision == "fp8":
                    fp8_steps += max(0, step - since)
                precision, since = to, step
            if precision == "fp8":
                fp8_steps += max(0, steps - since)
            gemms[gemm] = {"fp8_steps": fp8_steps, "final_precision": precision}
        decisions = _decisions(switches)
        fp8_steps = sum(g["fp8_steps"] for g in gemms.values()) / len(GEMMS)
        layers[name] = {
            "fp8_steps": fp8_steps, "fp8_time_fraction": fp8_steps / steps if steps else None,
            "promotions": dict(Counter(r for _, _, to, r, _ in decisions if to == "bf16")),
            "demotions": dict(Counter(r for _, _, to, r, _ in decisions if to == "fp8")),
            "first_promotion_step": next((s for s, _, to, _, _ in decisions if to == "bf16"), None),
            "final_precision": layer_precision({g: v["final_precision"] for g, v in gemms.items()}),
            "gemms": gemms,
        }
        fp8_flops += info["flops"] * fp8_steps
        all_flops += info["flops"] * steps
    decisions = _decisions(state.switches)
    return {
        "run": state.run, "files": sorted(state.files), "steps": steps, "ended": state.ended,
        "switches": len(state.switches),
        "promotions": sum(1 for d in decisions if d[2] == "bf16"),
        "demotions": sum(1 for d in decisions if d[2] == "fp8"),
        "gemm_promotions": sum(1 for s in state.switches if s[4] == "bf16"),
        "fp8_flop_fraction": fp8_flops / all_flops if all_flops else None,
        "layers": layers,
        "rollout_switches": [dict(zip(("step", "layer", "from", "to", "reason", "map_version"), s))
                             for s in sorted(state.rollout_switches)],
    }


def summarize(paths: Iterable[str | Path]) -> dict:
    runs, skipped = collect(paths)
    return {"runs": [summarize_run(r) for r in runs.values()], "skipped_lines": skipped.count,
            "skipped_examples": skipped.examples,
            "unsupported_versions": {str(v): n for v, n in skipped.versions.items()}, "unreadable": skipped.explain()}


def main_run(path: str | Path) -> RunState:
    """The run a single-log command looks at: the longest one in the file (a log may hold several ids).
    A log without one readable run (empty, binary, all lines damaged) is an error that says so."""
    runs, skipped = collect([path])
    if not runs:
        raise ValueError(f"{path}: no readable run in it ({skipped.explain()})")
    return max(runs.values(), key=lambda r: r.last_step)


def compare(path_a: str | Path, path_b: str | Path) -> dict:
    """Which layers' precision timelines differ between two logs, and from which step."""
    a, b = main_run(path_a), main_run(path_b)
    if set(a.layers) != set(b.layers):
        only_a, only_b = sorted(set(a.layers) - set(b.layers)), sorted(set(b.layers) - set(a.layers))
        raise ValueError(f"cannot compare runs of different models: {len(only_a)} layer(s) only in {path_a} "
                         f"(e.g. {only_a[:2]}), {len(only_b)} only in {path_b} (e.g. {only_b[:2]})")
    sa, sb = set(a.switches), set(b.switches)
    layers = sorted(set(a.layers) | set(b.layers))
    diff = {}
    for name in layers:
        only_a = sorted(s for s in sa - sb if s[1] == name)
        only_b = sorted(s for s in sb - sa if s[1] == name)
        if only_a or only_b:
            diff[name] = {"first_difference_step": min(s[0] for s in only_a + only_b),
                          "only_in_a": [_sw(s) for s in only_a], "only_in_b": [_sw(s) for s in only_b]}
    return {"a": str(path_a), "b": str(path_b), "identical": not diff, "layers": diff}


MAX_ROWS = 100
"""Rows a timeline draws: past this many layers it draws aggregates (each row a block of consecutive layers, its
colour the share of them in FP8), or the layers ``layers`` names. The picture's size and memory stay bounded
whatever a log's ``run_start`` claims (5,000 layers once took 243 s and 7.8 GB for one PNG)."""
MAX_LABELS = 300
"""Switches annotated with their reason; past this many, markers only (past ``10 x`` this, none)."""


def pyplot():
    """matplotlib.pyplot on the Agg backend, or an error saying what to install."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("drawing needs matplotlib: pip install -e '.[analysis]'") from None
    return plt


def timeline_rows(state: RunState, layers: str | None = None, max_rows: int = MAX_ROWS,
                  say=lambda note: None) -> list[list[str]]:
    """The timeline's rows: each a list of consecutive layers (one, unless past ``max_rows`` layers)."""
    names = list(state.layers)
    if layers is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, layers)]
        if not names:
            raise RuntimeError(f"timeline: no layer of run {state.run} matches --layers {layers!r}")
    per_row = -(-len(names) // max_rows) if names else 1
    if per_row > 1:
        say(f"{len(names)} layers: each row aggregates {per_row} consecutive layers (colour: their share in FP8); "
            "draw fewer with --layers PATTERN")
    return [names[i: i + per_row] for i in range(0, len(names), per_row)]


def draw_timeline(ax, state: RunState, rows: list[list[str]], max_columns: int = 2000, say=lambda note: None):
    """Layer x step picture of precision (FP8 / BF16) on ``ax``, a marker at every switch."""
    from matplotlib.colors import LinearSegmentedColormap

    steps = max(1, state.last_step)
    stride = max(1, -(-steps // max_columns))
    cols = -(-steps // stride)
    stripes = len(GEMMS)   # each row is a band of three stripes: fprop, dgrad, wgrad (top to bottom)
    switches: dict[tuple[str, str], list] = {}
    for sw in state.switches:
        switches.setdefault((sw[1], sw[2]), []).append(sw)
    grid = []   # per stripe and column, the share of its row's layers with that GEMM in FP8 (1 = fp8, 0 = bf16)
    for group in rows:
        for gemm in GEMMS:
            fp8 = [0] * (cols + 1)   # a difference array: each layer adds its FP8 intervals
            for name in group:
                precision, since = state.layers[name]["initial"][gemm], 0
                end = [(steps, name, gemm, None, None, None)]
                for step, _, _, _, to, _ in sorted(switches.get((name, gemm), [])) + end:
                    lo, hi = since // stride, min(cols, -(-step // stride))
                    if precision == "fp8" and hi > lo:
                        fp8[lo] += 1
                        fp8[hi] -= 1
                    precision, since = to, step
            stripe, running = [], 0
            for c in range(cols):
                running += fp8[c]
                stripe.append(min(1.0, running / len(group)))
            grid.append(stripe)
    cmap = LinearSegmentedColormap.from_list("precision", ["#e07b39", "#3a7dc9"])
    ax.imshow(grid or [[1.0]], aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=1,
              extent=(0, steps, len(rows) - 0.5, -0.5))
    row_of = {name: r for r, group in enumerate(rows) for name in group}
    drawn = [d for d in _decisions(state.switches) if d[1] in row_of]
    if len(drawn) > 10 * MAX_LABELS:
        say(f"{len(drawn)} decisions: not marked (the colours show them)")
    for step, layer, to, reason, gemms in drawn if len(drawn) <= 10 * MAX_LABELS else ():
        y = row_of[layer] + ((GEMMS.index(gemms[0]) - 1) / stripes if len(gemms) == 1 else 0)
        ax.plot(step, y, marker="v" if to == "bf16" else "^", color="black", markersize=6)
        if len(drawn) <= MAX_LABELS:
            label = reason if len(gemms) == len(GEMMS) else f"{reason} ({'+'.join(gemms)})"
            ax.annotate(label, (step, y), xytext=(3, 7 if to == "bf16" else -11), textcoords="offset points",
                        fontsize=6)
    for i in range(len(rows) - 1):   # a white rule between rows, so each band of three stripes reads as one
        ax.axhline(i + 0.5, color="white", linewidth=1.5)
    labels = [g[0] if len(g) == 1 else f"{g[0]} .. ({len(g)})" for g in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_xlim(0, steps)
    ax.set_xlabel("step")
    ax.set_title(f"precision timeline of run {state.run}: blue FP8, orange BF16; v promotion, ^ return to FP8\n"
                 "each layer is three stripes, top to bottom: fprop, dgrad, wgrad", fontsize=9)


def timeline(path: str | Path, out: str | Path, max_columns: int = 2000, layers: str | None = None,
             max_rows: int = MAX_ROWS, say=lambda note: None) -> Path:
    """The precision timeline of the log at ``path`` as a PNG; needs matplotlib. ``layers``: an fnmatch pattern
    of the layers to draw. Past ``max_rows`` layers the rows are aggregates of consecutive layers (their share
    in FP8); ``say`` is told what was aggregated or left out."""
    plt = pyplot()
    state = main_run(path)
    rows = timeline_rows(state, layers, max_rows, say)
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(rows) + 1.6))
    draw_timeline(ax, state, rows, max_columns, say)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def _sw(s: tuple) -> dict:
    return dict(zip(("step", "layer", "gemm", "from", "to", "reason"), s))


def export_rows(paths: Iterable[str | Path], skipped: Skipped) -> Iterator[dict]:
    """Flat rows: one per switch, one per (stats record, layer)."""
    for path in log_paths(paths):
        for rec in stream(path, skipped, want_stats=True):
            if rec["kind"] == "switch":
                for gemm in gemm_of(rec):
                    yield {"kind": "switch", "run": rec.get("run"), "step": rec["step"], "layer": rec["layer"],
                           "gemm": gemm, "from": rec["from"], "to": rec["to"], "reason": rec["reason"],
                           **{f"signal_{k}": v for k, v in rec.get("signals", {}).items()}}
            elif rec["kind"] == "rollout_switch":
                yield {"kind": "rollout_switch", "run": rec.get("run"), "step": rec["step"], "layer": rec["layer"],
                       "from": rec["from"], "to": rec["to"], "reason": rec["reason"], "map_version": rec["map_version"],
                       **{f"signal_{k}": v for k, v in rec.get("signals", {}).items()}}
            elif rec["kind"] == "stats":
                for layer, sig in rec.get("layers", {}).items():
                    gemms = sig.get("gemms") if isinstance(sig.get("gemms"), dict) else {}
                    yield {"kind": "stats", "run": rec.get("run"), "step": rec["step"], "layer": layer,
                           **{f"{g}_precision": gemms.get(g, sig.get("precision")) for g in GEMMS},
                           **{(k if k in ("precision", "state") else f"signal_{k}"): v for k, v in sig.items()
                              if k != "gemms"}}


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
