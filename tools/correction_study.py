"""When does the train/inference correction matter? An ablation of the RL loss over staleness and rollout precision.

    python tools/correction_study.py [--config configs/rl_tiny_cpu.toml] [--steps 300] [--seeds 0 1] [--jobs 2]
                                     [--out runs/correction_study] [--resume] [--set key=value ...]

Arms (each an async run of ``--config``, dynamic training precision, over ``--seeds``):
  correction none / tis / icepop  x  rl.max_staleness 0 / 2 / 8  x  rollout.precision bf16 / fp8 / follow,
  and AReaL's baseline, naive PPO (``rl.loss.objective = "naive"``: the PPO ratio on the behaviour policy),
  at staleness 0 / 4 / 8 with the FP8 rollout.

Per arm it records the held-out reward (initial, final, best), the share of tokens the correction masked,
TIS's clipped share, the PPO clip's share (``rl/clip_fraction``) and ``rl/ppo_kl``, the mismatch
(``rollout_corr/k3_kl``, mean over logged steps), the staleness of the
trained samples and the samples/s; an arm that fails is recorded with its error, not fatal. Writes to
``--out``: ``correction_study.json``, ``correction_study.md`` (the table of docs/results.md, "When the correction
matters", means over seeds) and
``correction_study.png`` (final reward against max staleness, one panel per rollout precision). ``--resume``
keeps the arms of an interrupted study that finished and reruns the rest. ``--jobs`` arms run side by side,
each with one torch thread (this machine: 2 cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _arms import fresh_dir, run_arm

CORRECTIONS = ("none", "tis", "icepop")
STALENESS = (0, 2, 8)
ROLLOUT = ("bf16", "fp8", "follow")
NAIVE_STALENESS = (0, 4, 8)


def arms(seeds: list[int], corrections=CORRECTIONS, staleness=STALENESS, rollout=ROLLOUT,
         naive_staleness=NAIVE_STALENESS) -> dict[str, dict]:
    out = {}
    grid = [(c, s, r, "decoupled") for c, s, r in itertools.product(corrections, staleness, rollout)]
    grid += [("none", s, "fp8", "naive") for s in naive_staleness]
    for (correction, staleness, rollout, objective), seed in itertools.product(grid, seeds):
        name = f"{'naive' if objective == 'naive' else correction}_st{staleness}_{rollout}_s{seed}"
        out[name] = {"correction": correction, "max_staleness": staleness, "rollout": rollout,
                     "objective": objective, "seed": seed,
                     "sets": [f'rl.loss.correction="{correction}"', f'rl.loss.objective="{objective}"',
                              f"rl.max_staleness={staleness}", f'rollout.precision="{rollout}"', f"train.seed={seed}"]}
    return out


def measure(run_dir: Path, summary: dict) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return statistics.mean(values) if values else None
    hist = {int(k): v for k, v in summary["staleness_histogram"].items()}
    evals = [r["eval/reward"] for r in rows if "eval/reward" in r]
    return {"reward_initial": summary["reward_initial"], "reward_final": summary["reward_final"],
            "reward_best": max(evals, default=None), "masked_fraction": summary["icepop_masked_fraction"],
            "tis_clipfrac": mean("tis_clipfrac"), "k3_kl": mean("rollout_corr/k3_kl"),
            "clip_fraction": mean("rl/clip_fraction"), "ppo_kl": mean("rl/ppo_kl"),
            "staleness_mean": sum(k * v for k, v in hist.items()) / max(sum(hist.values()), 1),
            "samples_per_s": summary["samples_per_s"], "rl_wall_s": summary["rl_wall_s"]}


def run_one(name: str, arm: dict, args, out: Path) -> dict:
    run_dir = out / name
    if (run_dir / "summary.json").exists():   # --resume: finished before
        return {**arm, **measure(run_dir, json.loads((run_dir / "summary.json").read_text()))}
    shutil.rmtree(run_dir, ignore_errors=True)   # an arm the interruption cut short starts again
    try:
        s = run_arm(args.config, run_dir, [f"train.steps={args.steps}", *args.set, *arm["sets"]], module="rl.train",
                    log=out / f"{name}.log", threads=1)
    except subprocess.CalledProcessError:
        tail = (out / f"{name}.log").read_text().strip().splitlines()[-1:]
        print(f"   {name} failed: {tail}", flush=True)
        return {**arm, "error": tail[0] if tail else "failed"}
    result = {**arm, **measure(run_dir, s)}
    print(f"   {name}: reward {result['reward_initial']:.3f} -> {result['reward_final']:.3f}, k3 "
          f"{result['k3_kl']:.2e}, masked {result['masked_fraction']:.2%}", flush=True)
    return result


def table(results: dict) -> list[dict]:
    """Means over seeds, one row per arm."""
    groups: dict[tuple, list] = {}
    for r in results.values():
        groups.setdefault((r["objective"], r["correction"], r["max_staleness"], r["rollout"]), []).append(r)
    rows = []
    for (objective, correction, staleness, rollout), rs in groups.items():
        ok = [r for r in rs if "error" not in r]

        def avg(key: str) -> float | None:
            return statistics.mean(r[key] for r in ok) if ok and all(r[key] is not None for r in ok) else None
        rows.append({"loss": "naive PPO" if objective == "naive" else correction, "max_staleness": staleness,
                     "rollout": rollout, "seeds": len(rs), "failed": len(rs) - len(ok),
                     "reward_initial": avg("reward_initial"), "reward_final": avg("reward_final"),
                     "reward_final_by_seed": [r.get("reward_final") for r in rs],
                     "masked_fraction": avg("masked_fraction"), "k3_kl": avg("k3_kl"),
                     "clip_fraction": avg("clip_fraction"), "staleness_mean": avg("staleness_mean")})
    return rows


def markdown(rows: list[dict]) -> str:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    lines = ["| loss | max staleness | rollout | held-out reward (per seed) | masked | `rollout_corr/k3_kl` | "
             "`rl/clip_fraction` | mean staleness |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seeds = " / ".join(f(v, ".3f") for v in r["reward_final_by_seed"])
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        lines.append(f"| {r['loss']} | {r['max_staleness']} | {r['rollout']} | {f(r['reward_initial'], '.3f')} -> "
                     f"**{f(r['reward_final'], '.3f')}** ({seeds}){failed} | {f(r['masked_fraction'], '.2%')} | "
                     f"{f(r['k3_kl'], '.1e')} | {f(r.get('clip_fraction'), '.2%')} | {f(r['staleness_mean'], '.2f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str = "") -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot (pip install -e '.[analysis]')", file=sys.stderr)
        return False
    def seeds(r: dict) -> list[float]:
        return [v for v in r["reward_final_by_seed"] if v is not None]

    rollouts = [r for r in ROLLOUT if any(row["rollout"] == r for row in rows)]   # a subset study: its panels only
    fig, axes = plt.subplots(1, len(rollouts), figsize=(4 * len(rollouts), 3.6), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, rollout in zip(axes, rollouts):
        for i, loss in enumerate((*CORRECTIONS, "naive PPO")):
            mine = [r for r in rows if r["rollout"] == rollout and r["loss"] == loss and r["reward_final"] is not None]
            pts = sorted((r["max_staleness"], r["reward_final"], seeds(r))
                         for r in mine)
            if not pts:
                continue
            x = [p[0] + 0.12 * (i - 1.5) for p in pts]   # side by side, so the seed ranges do not hide each other
            lo = [p[1] - min(p[2]) for p in pts]
            hi = [max(p[2]) - p[1] for p in pts]
            ax.errorbar(x, [p[1] for p in pts], yerr=[lo, hi], marker="o", capsize=3, label=loss,
                        color=f"C{i}", linestyle="--" if loss == "naive PPO" else "-")
        ax.set_title(f"rollout {rollout}")
        ax.set_xlabel("rl.max_staleness")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out reward (mean; bars: seed range)")
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    axes[0].legend(list(handles.values()), list(handles), loc="best", fontsize="small")
    if title:   # wrapped: one panel is narrower than the title (it was clipped at both sides)
        fig.suptitle(textwrap.fill(title, width=max(40, 48 * len(rollouts))), fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="A subset of the grid: "
                                 "--corrections, --staleness, --rollout, --naive-staleness.")
    ap.add_argument("--config", default="configs/rl_tiny_cpu.toml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2, help="arms run side by side (one torch thread each)")
    ap.add_argument("--out", default="runs/correction_study")
    ap.add_argument("--resume", action="store_true", help="keep the finished arms of an interrupted study")
    ap.add_argument("--set", action="append", default=[], help="an override for every arm (repeatable)")
    ap.add_argument("--corrections", nargs="*", default=list(CORRECTIONS), choices=CORRECTIONS)
    ap.add_argument("--staleness", nargs="*", type=int, default=list(STALENESS))
    ap.add_argument("--rollout", nargs="*", default=list(ROLLOUT), choices=ROLLOUT)
    ap.add_argument("--naive-staleness", nargs="*", type=int, default=list(NAIVE_STALENESS),
                    help="naive-PPO arms (FP8 rollout); none: no naive arm")
    args = ap.parse_args()
    if args.jobs < 1 or args.steps < 1:
        ap.error("--jobs and --steps must be >= 1")
    out = Path(args.out) if args.resume else fresh_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = arms(args.seeds, args.corrections, args.staleness, args.rollout, args.naive_staleness)
    print(f"{len(todo)} arms of {args.steps} RL steps, {args.jobs} at a time, into {out}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip(todo, pool.map(lambda item: run_one(*item, args, out), todo.items())))
    rows = table(done)
    md = markdown(rows)
    print("\n" + md)
    (out / "correction_study.json").write_text(json.dumps(
        {"config": args.config, "steps": args.steps, "seeds": args.seeds, "overrides": args.set,
         "arms": done, "table": rows}, indent=2) + "\n")
    (out / "correction_study.md").write_text(md)
    title = ", ".join([Path(args.config).name, f"{args.steps} RL steps", *args.set])
    wrote_plot = plot(rows, out / "correction_study.png", title)
    print(f"written {out / 'correction_study.json'}, {out / 'correction_study.md'}"
          + (f", {out / 'correction_study.png'}" if wrote_plot else ""))
    return 1 if any("error" in r for r in done.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
