"""The picture of a run: what training did and what precision did, in one PNG. Every training command draws it
into its run directory at the end (``run.png``); ``precisionrt-log plot RUN_DIR [-o FILE]`` draws it for any
run, finished or still running.

Panels, top to bottom, from the run directory's ``metrics.jsonl`` and ``precision_events.jsonl``:

- RL: held-out reward (greedy, the evaluation's) and sampled reward (the rollouts') per RL step; staleness
  (mean, in policy versions) and IcePop's masked share of tokens per RL step.
- LM: train and held-out loss per step.
- Both: the precision timeline of every layer's three GEMMs with each switch marked and its reason
  (``analysis.draw_timeline``). Its steps are the runtime's, optimizer steps: in RL the supervised warm start's
  come first, and a dashed line marks where RL starts.

Needs matplotlib (``pip install -e '.[analysis]'``); like the rest of ``observe`` it does not import torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from precisionrt.observe.analysis import draw_timeline, main_run, pyplot, timeline_rows

PICTURE = "run.png"
"""The file every command writes into its run directory."""
DPI = 110


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` that parse as JSON objects (a line being written, or damaged, is left out)."""
    rows = []
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return rows
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``key``'s finite values and their steps."""
    points = [(r["step"], float(r[key])) for r in rows
              if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def _warm_start_steps(run_dir: Path) -> int:
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        return int(config.get("train", {}).get("warm_start_steps", 0) or 0)
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def _lines(ax, rows: list[dict], curves: list[tuple[str, str, str]], ylabel: str) -> None:
    for key, label, style in curves:
        steps, values = series(rows, key)
        if steps:
            ax.plot(steps, values, style, label=label, markersize=3, linewidth=1.2)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def draw_run(run_dir: str | Path, say=lambda note: None):
    """The run in ``run_dir`` as a matplotlib Figure (the caller closes it)."""
    plt = pyplot()
    run_dir = Path(run_dir)
    log = run_dir / "precision_events.jsonl"
    if not log.is_file():
        raise RuntimeError(f"{run_dir} holds no run: no precision_events.jsonl")
    rows = read_metrics(run_dir)
    state = main_run(log)
    layer_rows = timeline_rows(state, say=say)
    rl = any("rl/reward" in r for r in rows)
    heights = [3, 2] if rl else [3]
    heights.append(max(2.0, 0.3 * len(layer_rows) + 1.2))
    fig, axes = plt.subplots(len(heights), 1, figsize=(10, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights})
    if rl:
        reward, staleness = axes[0], axes[1]
        _lines(reward, rows, [("eval/reward", "held-out reward (greedy)", "o-"),
                              ("rl/reward", "sampled reward", "-")], "reward")
        reward.set_title(f"run {run_dir.name}: RL", fontsize=10)
        _lines(staleness, rows, [("rl/staleness_mean", "staleness (policy versions)", "-")], "staleness")
        staleness.legend(fontsize=8, loc="upper left")
        masked = staleness.twinx()
        steps, values = series(rows, "rl/masked_fraction")
        masked.plot(steps, [100 * v for v in values], "-", color="#c0392b", linewidth=1.0,
                    label="IcePop masked share (%)")
        masked.set_ylabel("masked tokens (%)")
        masked.legend(fontsize=8, loc="upper right")
        staleness.set_xlabel("RL step")
    else:
        loss = axes[0]
        _lines(loss, rows, [("train/loss", "train loss", "-"), ("eval/loss", "held-out loss", "o-")], "loss")
        loss.set_title(f"run {run_dir.name}: language model", fontsize=10)
        loss.set_xlabel("step")
    timeline_ax = axes[-1]
    draw_timeline(timeline_ax, state, layer_rows, say=say)
    warm = _warm_start_steps(run_dir) if rl else 0
    if warm:
        timeline_ax.axvline(warm, color="black", linestyle="--", linewidth=1)
        timeline_ax.annotate("RL starts", (warm, -0.5), xytext=(3, -9), textcoords="offset points", fontsize=7)
        timeline_ax.set_xlabel("optimizer step (the supervised warm start, then RL)")
    fig.tight_layout()
    return fig


def plot_run(run_dir: str | Path, out: str | Path | None = None, say=lambda note: None) -> Path:
    """Draw the run in ``run_dir`` to ``out`` (default ``run_dir/run.png``); returns the path written."""
    fig = draw_run(run_dir, say)
    out = Path(out) if out is not None else Path(run_dir) / PICTURE
    try:
        fig.savefig(out, dpi=DPI)
    finally:
        pyplot().close(fig)
    return out
