"""Per-GEMM against per-layer promotion on the tiny LM: under a fault in the backward pass (``grad_outlier``), one
in the forward pass (``outlier``), and none; two seeds each. Prints a table and writes JSON.

    python tools/gemm_study.py [--config configs/lm_tiny_cpu.toml] [--out runs/gemm_study] [--seeds 0 1]
        [--set key=value ...]

Every arm runs in its own process, one after the other. For each: held-out loss, the FP8 share of the managed
layers' GEMM FLOPs, and which GEMMs the runtime moved (layer: GEMMs, reason, step).
"""

import argparse
import json
import sys

from _arms import fresh_dir, run_arm

LAYER = "decoder.layers.2.mlp.linear_fc2"
FAULTS = {
    "grad_outlier": ['inject.kind="grad_outlier"', f'inject.layer="{LAYER}"', "inject.start_step=100",
                     "inject.factor=1e12", "inject.channels=[3]"],
    "outlier": ['inject.kind="outlier"', f'inject.layer="{LAYER}"', "inject.start_step=100", "inject.factor=1e6"],
    "none": [],
}
GRANULARITIES = ("gemm", "layer")


def moved(summary: dict) -> list[str]:
    """The switches as decisions: ``layer: gemm+gemm -> to (reason) @ step``."""
    out: dict[tuple, list] = {}
    for s in summary["switches"]:
        out.setdefault((s["step"], s["layer"], s["to"], s["reason"]), []).append(s["gemm"])
    return [f"{layer.replace('decoder.layers.', 'L')}: {'+'.join(g)} -> {to} ({reason}) @ {step}"
            for (step, layer, to, reason), g in out.items()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/lm_tiny_cpu.toml")
    p.add_argument("--out", default="runs/gemm_study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    out = fresh_dir(args.out)
    out.mkdir(parents=True)
    rows = []
    for fault, extra in FAULTS.items():
        for granularity in GRANULARITIES:
            for seed in args.seeds if fault != "none" else args.seeds[:1]:
                name = f"{fault}_{granularity}_seed{seed}"
                s = run_arm(args.config, out / name, [*extra, f'precision.policy.granularity="{granularity}"',
                                                      f"train.seed={seed}", *args.overrides],
                            log=out / f"{name}.log")
                rows.append({"fault": fault, "granularity": granularity, "seed": seed,
                             "final_eval_loss": s["final_eval_loss"], "fp8_flop_fraction": s["fp8_flop_fraction"],
                             "promotions": sum(1 for m in moved(s) if "-> bf16" in m), "moved": moved(s)})
                print(f"   {name}: eval {s['final_eval_loss']:.4f}, fp8 {s['fp8_flop_fraction']:.1%}, "
                      f"{moved(s) or 'nothing moved'}", flush=True)
    result = {"config": args.config, "overrides": args.overrides, "layer": LAYER, "faults": FAULTS, "rows": rows}
    (out / "gemm_study.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'fault':<13} {'granularity':<11} {'seed':>4} {'eval loss':>10} {'fp8 FLOPs':>10}  GEMMs moved")
    for r in rows:
        print(f"{r['fault']:<13} {r['granularity']:<11} {r['seed']:>4} {r['final_eval_loss']:>10.4f} "
              f"{r['fp8_flop_fraction']:>10.1%}  {'; '.join(r['moved']) or '-'}")
    print(f"written: {out / 'gemm_study.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
