"""The injected-outlier demo: BF16, static FP8 and dynamic precision on the same run with the same
function-preserving outlier (contract C6) ramping into one mid-network layer.

    python tools/outlier_demo.py [--config configs/lm_tiny_cpu.toml] [--out runs/outlier_demo]
        [--layer decoder.layers.2.mlp.linear_fc2] [--start 200] [--ramp 100] [--factor 1e4] [--set key=value ...]

Prints the three-arm table (final held-out loss, gap to BF16, FP8 FLOP share, promotions and their steps vs
the injection start and vs the first check where a signal of the injected layer crossed its threshold) and
writes outlier_demo.json beside the three run directories.
"""

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from _arms import fresh_dir, run_arm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from precisionrt.events import iter_records  # noqa: E402
from precisionrt.policy import REASON_OF, PolicyConfig  # noqa: E402


def first_crossing(run_dir: Path, layer: str) -> dict | None:
    """First check at which any threshold-bearing signal of ``layer`` exceeded its default threshold."""
    thresholds = asdict(PolicyConfig())
    for rec in iter_records(run_dir / "precision_events.jsonl"):
        if rec["kind"] != "stats":
            continue
        sig = rec["layers"][layer]
        for name in REASON_OF:
            v, t = sig.get(name), thresholds[name]
            if t > 0 and isinstance(v, (int, float)) and v > t:
                return {"step": rec["step"], "signal": name, "value": v, "threshold": t}
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/lm_tiny_cpu.toml")
    p.add_argument("--out", default="runs/outlier_demo")
    p.add_argument("--layer", default="decoder.layers.2.mlp.linear_fc2")
    p.add_argument("--start", type=int, default=200)
    p.add_argument("--ramp", type=int, default=100)
    p.add_argument("--factor", type=float, default=1e4)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    out = fresh_dir(args.out)
    inject = ['inject.kind="outlier"', f'inject.layer="{args.layer}"', f"inject.start_step={args.start}",
              f"inject.ramp_steps={args.ramp}", f"inject.factor={args.factor}"]
    arms = {
        "bf16": ['precision.mode="bf16"'],
        "fp8": ['precision.mode="fp8"', "precision.observe=true"],   # observe: signals logged, no decisions
        "dynamic": ['precision.mode="dynamic"'],
    }
    summaries = {name: run_arm(args.config, out / name, [*extra, *inject, *args.overrides])
                 for name, extra in arms.items()}
    base = summaries["bf16"]["final_eval_loss"]
    crossing = first_crossing(out / "dynamic", args.layer)
    table = {}
    for name, s in summaries.items():
        promotions = [sw for sw in s["switches"] if sw["to"] == "bf16"]
        table[name] = {
            "final_eval_loss": s["final_eval_loss"], "gap_vs_bf16": (s["final_eval_loss"] - base) / base,
            "fp8_flop_fraction": s["fp8_flop_fraction"], "switches": s["switches"],
            "promoted_layers": sorted({sw["layer"] for sw in promotions}),
            "first_promotion_step": promotions[0]["step"] if promotions else None,
        }
    dyn = table["dynamic"]
    result = {"config": args.config, "overrides": args.overrides, "inject": inject,
              "injection_start_step": args.start + 1, "first_threshold_crossing": crossing, "arms": table,
              "promotion_delay_after_crossing": (dyn["first_promotion_step"] - crossing["step"])
              if crossing and dyn["first_promotion_step"] else None}
    (out / "outlier_demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\noutlier x{args.factor:g} into {args.layer}, from step {args.start + 1} over {args.ramp} steps")
    print(f"{'arm':<8} {'held-out loss':>14} {'vs bf16':>8} {'fp8 FLOPs':>10}  promotions")
    for name, r in table.items():
        promos = ", ".join(f"{sw['layer']}@{sw['step']} ({sw['reason']})" for sw in r["switches"]
                           if sw["to"] == "bf16") or "-"
        print(f"{name:<8} {r['final_eval_loss']:>14.4f} {r['gap_vs_bf16']:>+8.2%} {r['fp8_flop_fraction']:>10.1%}  {promos}")
    if crossing:
        print(f"first threshold crossing: step {crossing['step']} ({crossing['signal']} = {crossing['value']:.3g}"
              f" > {crossing['threshold']:g}); promotion {result['promotion_delay_after_crossing']} steps later")
    print(f"written: {out / 'outlier_demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
