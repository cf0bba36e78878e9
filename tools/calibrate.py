"""Calibrate the policy's thresholds on a healthy run of your own model.

    python tools/calibrate.py --config configs/my_model.toml [--set key=value ...] --steps 300 \
        [--out runs/calibrate] [--margin 3] [--write thresholds.toml] [--json report.json]
    python tools/calibrate.py --runs RUN_DIR [RUN_DIR ...] [--margin 3] [--write thresholds.toml]

With ``--config`` it first trains the model in static FP8 with the monitors observing
(``precision.mode="fp8"``, ``precision.observe=true``: every check logs its signals, nothing is switched) for
``--steps`` steps. Then, from the stats records of the switch log(s), it prints for every signal and every
layer role (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``, ...) the distribution over
layers and checks (worst, p99, median) next to the current default threshold and the margin between them
(threshold / worst; for ``grad_cos``, (1 - threshold) / (1 - worst)). A margin under 1 means the default
would promote that healthy layer.

``--write`` writes a ``[precision.policy]`` table with each acting threshold set to the worst healthy value
over all roles times ``--margin`` (for ``grad_cos``: 1 - margin * (1 - worst)), never below a floor for the
share signals (``FLOORS``). Signals that never left 0 keep their default. Paste the table into the run
configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from _arms import fresh_dir, run_arm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from precisionrt.observe.events import EVENTS_FILE, iter_records  # noqa: E402
from precisionrt.runtime.policy import PolicyConfig  # noqa: E402

# Signals a threshold acts on (others are logged only), and the one where lower is worse.
ACTING = ("overflow", "headroom", "underflow_energy_fwd", "underflow_energy_grad", "quant_error", "grad_rel_err",
          "grad_cos")
LOGGED = ("underflow", "amax_jump", "grad_norm_z")
LOWER_IS_WORSE = {"grad_cos"}
# Suggested thresholds never go below these: a healthy value of 1e-15 says the signal is clean, not that a
# share of 3e-15 is harmful (a thousandth of the product's energy flushed, or of the values saturated, is).
FLOORS = {"overflow": 1e-4, "underflow_energy_fwd": 1e-3, "underflow_energy_grad": 1e-3}


def role_of(layer: str) -> str:
    return layer.rsplit(".", 1)[-1]


def collect(runs: list[Path]) -> tuple[dict[str, dict[str, list[float]]], int]:
    """signal -> role -> healthy values over every layer and check (BF16 layers' dry runs excluded)."""
    values: dict[str, dict[str, list[float]]] = {}
    skipped: list[str] = []
    for run in runs:
        for rec in iter_records(run / EVENTS_FILE, skipped):
            if rec.get("kind") != "stats":
                continue
            for layer, sig in rec["layers"].items():
                if sig.get("precision") != "fp8":
                    continue
                for name in ACTING + LOGGED:
                    v = sig.get(name)
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        values.setdefault(name, {}).setdefault(role_of(layer), []).append(float(v))
    return values, len(skipped)


def distribution(vals: list[float], lower_is_worse: bool) -> dict:
    a = np.asarray(vals)
    if lower_is_worse:
        return {"worst": float(a.min()), "p99": float(np.percentile(a, 1)), "median": float(np.median(a)),
                "n": len(vals)}
    return {"worst": float(a.max()), "p99": float(np.percentile(a, 99)), "median": float(np.median(a)),
            "n": len(vals)}


def margin_to(threshold: float, worst: float, name: str) -> float | None:
    if threshold == 0:
        return None   # trigger off
    if name in LOWER_IS_WORSE:
        return (1 - threshold) / (1 - worst) if worst < 1 else math.inf
    return threshold / worst if worst > 0 else math.inf


def report(values: dict, thresholds: dict) -> dict:
    out = {}
    for name in ACTING + LOGGED:
        for role, vals in sorted(values.get(name, {}).items()):
            d = distribution(vals, name in LOWER_IS_WORSE)
            d["threshold"] = thresholds.get(name)
            d["margin"] = margin_to(thresholds.get(name, 0.0), d["worst"], name)
            out.setdefault(name, {})[role] = d
    return out


def suggested(values: dict, margin: float, defaults: dict) -> dict[str, float]:
    out = {}
    for name in ACTING:
        vals = [v for role_vals in values.get(name, {}).values() for v in role_vals]
        if not vals:
            continue
        if name in LOWER_IS_WORSE:
            out[name] = round(max(0.0, 1 - margin * (1 - min(vals))), 4)
        elif max(vals) > 0:
            limit = 1.0 if name in ("overflow", "underflow_energy_fwd", "underflow_energy_grad") else math.inf
            out[name] = float(f"{min(limit, max(FLOORS.get(name, 0.0), max(vals) * margin)):.2g}")
        else:
            out[name] = defaults[name]   # never left 0: nothing to calibrate on
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="train this configuration healthy (static fp8, observing) first")
    src.add_argument("--runs", nargs="+", type=Path, help="analyse existing run directories")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="runs/calibrate")
    p.add_argument("--margin", type=float, default=3.0, help="suggested threshold = worst healthy value x this")
    p.add_argument("--write", type=Path, help="write a [precision.policy] TOML table here")
    p.add_argument("--json", type=Path, help="write the full report as JSON here")
    args = p.parse_args()
    if args.margin < 1:
        p.error("--margin must be >= 1: a threshold under the worst healthy value promotes healthy layers")

    runs = args.runs
    if args.config:
        run_dir = fresh_dir(args.out)
        run_arm(args.config, run_dir, [*args.overrides, 'precision.mode="fp8"', "precision.observe=true",
                                        f"train.steps={args.steps}"])
        runs = [run_dir]
    values, skipped = collect(runs)
    if not values:
        print(f"no stats records from FP8 layers in {[str(r) for r in runs]}: was the run in observe or "
              "dynamic mode?", file=sys.stderr)
        return 1
    defaults = asdict(PolicyConfig())
    rep = report(values, defaults)
    print(f"\nhealthy signal distributions over layers and checks (skipped log lines: {skipped})")
    print(f"{'signal':<22}{'role':<13}{'worst':>11}{'p99':>11}{'median':>11}{'threshold':>11}{'margin':>11}")
    for name, roles in rep.items():
        for role, d in roles.items():
            m = d["margin"]
            m_text = "off" if m is None else ("inf" if math.isinf(m) else f"{m:.3g}x")
            thr = d["threshold"]
            thr_text = "logged" if name in LOGGED and not thr else f"{thr:.3g}"
            print(f"{name:<22}{role:<13}{d['worst']:>11.3g}{d['p99']:>11.3g}{d['median']:>11.3g}"
                  f"{thr_text:>11}{m_text:>11}")
    table = suggested(values, args.margin, defaults)
    if args.write:
        lines = [f"# thresholds from healthy runs {[str(r) for r in runs]}: worst x {args.margin:g}",
                 "[precision.policy]"] + [f"{k} = {v!r}" for k, v in table.items()]
        args.write.write_text("\n".join(lines) + "\n")
        print(f"\nwrote {args.write}:\n" + "\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"runs": [str(r) for r in runs], "skipped_lines": skipped,
                                         "signals": rep, "suggested": table, "margin": args.margin},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
