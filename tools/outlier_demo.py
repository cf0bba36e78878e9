"""The injected-outlier demo: BF16, static FP8 and dynamic precision on the same runs with the same
function-preserving outlier (contract C6) ramping into one mid-network layer, plus healthy static FP8 (no
injection) as the yardstick for "static FP8 degrades". Every arm runs once per seed; gaps are paired by seed.

    python tools/outlier_demo.py [--config configs/lm_tiny_cpu.toml] [--out runs/outlier_demo]
        [--seeds 0 1 2] [--layer decoder.layers.1.mlp.linear_fc2] [--start 450] [--ramp 50]
        [--factor 1e6] [--set key=value ...]

Prints, per arm: held-out loss per seed and its mean, the mean paired gap to BF16 (with its range over seeds),
the FP8 share of GEMM FLOPs, and the promotions with their steps against the injection start and against the
first check at which a signal of the injected layer crossed its threshold. Writes outlier_demo.json beside the
run directories (``<out>/<arm>/seed<k>``). Four arms x 3 seeds of the tiny config take about 25 minutes on
2 cores. At scale, on a GPU (the rescue demo: five arms, two seeds, 1,000 steps of a 154M model):

    python tools/outlier_demo.py --config configs/lm_150m_gpu.toml --seeds 0 1 \
        --layer decoder.layers.6.mlp.linear_fc2 --start 700 --ramp 50 --out runs/outlier_demo_150m
"""

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

from _arms import fresh_dir, run_arm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from precisionrt.observe.events import iter_records  # noqa: E402
from precisionrt.runtime.policy import REASON_OF, PolicyConfig  # noqa: E402

ARMS = {  # name: (overrides, injected)
    "bf16": (['precision.mode="bf16"'], True),
    "fp8_healthy": (['precision.mode="fp8"'], False),
    "fp8": (['precision.mode="fp8"', "precision.observe=true"], True),  # observe: signals logged, no decisions
    "dynamic": (['precision.mode="dynamic"'], True),
    "dynamic_healthy": (['precision.mode="dynamic"'], False),   # false promotions, if any, show here
}


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


def arm_row(runs: dict[int, dict], base: dict[int, dict]) -> dict:
    """One arm over seeds: losses, paired gaps to BF16, FP8 share, promotions."""
    gaps = {k: (s["final_eval_loss"] - base[k]["final_eval_loss"]) / base[k]["final_eval_loss"]
            for k, s in runs.items()}
    promotions = {k: [sw for sw in s["switches"] if sw["to"] == "bf16"] for k, s in runs.items()}
    return {
        "final_eval_loss": {k: s["final_eval_loss"] for k, s in runs.items()},
        "mean_final_eval_loss": statistics.fmean(s["final_eval_loss"] for s in runs.values()),
        "gap_vs_bf16": gaps, "mean_gap_vs_bf16": statistics.fmean(gaps.values()),
        "fp8_flop_fraction": {k: s["fp8_flop_fraction"] for k, s in runs.items()},
        "mean_fp8_flop_fraction": statistics.fmean(s["fp8_flop_fraction"] for s in runs.values()),
        "switches": {k: s["switches"] for k, s in runs.items()},
        "promoted_layers": sorted({sw["layer"] for p in promotions.values() for sw in p}),
        "first_promotion_step": {k: p[0]["step"] if p else None for k, p in promotions.items()},
    }


def print_table(result: dict, seeds: list[int]) -> None:
    arms = result["arms"]
    print(f"\noutlier x{result['factor']:g} into {result['layer']}, ramp from step {result['injection_start_step']}"
          f" over {result['ramp_steps']} steps; seeds {seeds}")
    head = "".join(f"{'seed ' + str(k):>9}" for k in seeds)
    print(f"{'arm':<12}{head} {'mean':>8} {'vs bf16':>8} {'(range)':>17} {'fp8 FLOPs':>10}  promotions")
    for name, r in arms.items():
        losses = "".join(f"{r['final_eval_loss'][k]:>9.4f}" for k in seeds)
        lo, hi = min(r["gap_vs_bf16"].values()), max(r["gap_vs_bf16"].values())
        promos = "; ".join(f"s{k}: " + (", ".join(f"{sw['layer']}@{sw['step']}" for sw in r["switches"][k]
                                                 if sw["to"] == "bf16") or "-") for k in seeds)
        print(f"{name:<12}{losses} {r['mean_final_eval_loss']:>8.4f} {r['mean_gap_vs_bf16']:>+8.2%} "
              f"{f'({lo:+.2%}, {hi:+.2%})':>17} {r['mean_fp8_flop_fraction']:>10.1%}  {promos}")
    for k, c in result["first_threshold_crossing"].items():
        if c:
            delay = result["promotion_delay_after_crossing"][k]
            print(f"seed {k}: first threshold crossing at step {c['step']} ({c['signal']} = {c['value']:.3g} > "
                  f"{c['threshold']:g}); first promotion {delay} steps later")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/lm_tiny_cpu.toml")
    p.add_argument("--out", default="runs/outlier_demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--layer", default="decoder.layers.1.mlp.linear_fc2")
    p.add_argument("--start", type=int, default=450)
    p.add_argument("--ramp", type=int, default=50)
    p.add_argument("--factor", type=float, default=1e6)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                   help="arms to run (bf16 and dynamic are always run: the gaps and crossings need them)")
    args = p.parse_args()
    arms = {n: a for n, a in ARMS.items() if n in {*args.arms, "bf16", "dynamic"}}
    out = fresh_dir(args.out)
    inject = ['inject.kind="outlier"', f'inject.layer="{args.layer}"', f"inject.start_step={args.start}",
              f"inject.ramp_steps={args.ramp}", f"inject.factor={args.factor}"]
    runs: dict[str, dict[int, dict]] = {name: {} for name in arms}
    for seed in args.seeds:  # seed-major: an interrupted demo still has whole seeds
        for name, (extra, injected) in arms.items():
            overrides = [*extra, *(inject if injected else []), f"train.seed={seed}", *args.overrides]
            runs[name][seed] = run_arm(args.config, out / name / f"seed{seed}", overrides)
    base = runs["bf16"]
    table = {name: arm_row(r, base) for name, r in runs.items()}
    crossing = {k: first_crossing(out / "dynamic" / f"seed{k}", args.layer) for k in args.seeds}
    first = table["dynamic"]["first_promotion_step"]
    result = {"config": args.config, "overrides": args.overrides, "inject": inject, "layer": args.layer,
              "factor": args.factor, "ramp_steps": args.ramp, "injection_start_step": args.start + 1,
              "seeds": args.seeds, "first_threshold_crossing": crossing, "arms": table,
              "promotion_delay_after_crossing": {k: first[k] - c["step"] if c and first[k] else None
                                                 for k, c in crossing.items()}}
    (out / "outlier_demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result, args.seeds)
    print(f"written: {out / 'outlier_demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
