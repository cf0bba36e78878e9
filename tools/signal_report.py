"""Worst value of every monitor signal in a run's switch log, next to the policy's threshold.

    python tools/signal_report.py RUN_DIR [RUN_DIR ...] [--json OUT]

Used to calibrate PolicyConfig on healthy runs (run with precision.observe=true in a static mode, or in
dynamic mode): every healthy worst value should sit well below its threshold.
"""

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from precisionrt.observe.events import iter_records  # noqa: E402
from precisionrt.runtime.policy import PolicyConfig  # noqa: E402

SIGNALS = ("overflow", "headroom", "underflow", "underflow_energy_fwd", "underflow_energy_grad", "nonfinite", "quant_error", "amax_jump", "grad_rel_err",
           "grad_cos", "grad_norm_z")
LOWER_IS_WORSE = {"grad_cos"}


def worst(run_dir: Path) -> dict:
    out: dict = {}
    skipped: list[str] = []
    for rec in iter_records(run_dir / "precision_events.jsonl", skipped):
        if rec["kind"] != "stats":
            continue
        for layer, sig in rec["layers"].items():
            for name in SIGNALS:
                v = sig.get(name)
                if not isinstance(v, (int, float)):
                    continue
                best = out.get(name)
                if best is None or (v < best["value"] if name in LOWER_IS_WORSE else v > best["value"]):
                    out[name] = {"value": v, "layer": layer, "step": rec["step"]}
    return {"signals": out, "skipped_lines": len(skipped)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    thresholds = asdict(PolicyConfig())
    report = {str(r): worst(r) for r in args.runs}
    for run, res in report.items():
        print(f"\n{run}  (skipped lines: {res['skipped_lines']})")
        print(f"{'signal':<14} {'worst':>12} {'threshold':>10}  at")
        for name in SIGNALS:
            w = res["signals"].get(name)
            if w:
                print(f"{name:<14} {w['value']:>12.4g} {thresholds.get(name, float('nan')):>10.4g}  "
                      f"step {w['step']} {w['layer']}")
    if args.json:
        args.json.write_text(json.dumps({"thresholds": thresholds, "runs": report}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
