"""An injected outlier during RL, with the rollout engine in FP8 or following the trainer's precisions.

    python tools/follow_demo.py [--seeds 0 1] [--steps 200] [--start 60] [--out runs/follow_demo]

Arms (each an async run of configs/rl_tiny_cpu.toml with dynamic training precision):
  healthy       no fault, rollout.precision = "fp8" (the mismatch yardstick);
  fault_fp8     a x1e6 outlier into one input channel of ``--layer`` from RL step ``--start`` (ramped over 10
                steps; it reaches the rollout copy too), rollout.precision = "fp8";
  fault_follow  the same fault, rollout.precision = "follow".

The trainer promotes the layer to BF16 at a check; "fp8" keeps the rollout copy's layer in FP8 with the outlier,
"follow" moves it with the trainer. Prints a table (mismatch k3 KL and IcePop-masked share before and after the
fault, final held-out reward, the step of the rollout-side change) and writes follow_demo.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from _arms import fresh_dir, run_arm

ARMS = {"healthy": [], "fault_fp8": ["FAULT"], "fault_follow": ["FAULT", 'rollout.precision="follow"']}


def window_means(run_dir: Path, start: int) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rollout_corr/k3_kl" in r]
    out = {}
    for name, keep in (("before", lambda s: s < start), ("after", lambda s: s >= start + 10)):
        sel = [r for r in rows if keep(r["step"])]
        out[name] = {k: statistics.mean(r[k] for r in sel) if sel else None
                     for k in ("rollout_corr/k3_kl", "rl/masked_fraction", "train_rollout_logprob_abs_diff")}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--start", type=int, default=60, help="RL step at which the outlier starts")
    ap.add_argument("--layer", default="decoder.layers.1.mlp.linear_fc2")
    ap.add_argument("--out", default="runs/follow_demo")
    args = ap.parse_args()
    out = fresh_dir(args.out)
    warm = 25   # configs/rl_tiny_cpu.toml's warm start: the injector counts those optimizer steps too
    fault = ['inject.kind="outlier"', f'inject.layer="{args.layer}"', f"inject.start_step={warm + args.start - 1}",
             "inject.ramp_steps=10", "inject.factor=1e6", "inject.channels=[0]"]
    results = {}
    for seed in args.seeds:
        for arm, extra in ARMS.items():
            sets = [f"train.steps={args.steps}", f"train.seed={seed}", "train.log_every=5",
                    *sum((fault if e == "FAULT" else [e] for e in extra), [])]
            s = run_arm("configs/rl_tiny_cpu.toml", out / f"{arm}_s{seed}", sets, module="rl.train")
            results[f"{arm}_s{seed}"] = {"arm": arm, "seed": seed, "reward_final": s["reward_final"],
                                         "switches": s["switches"], "changes": s["rollout_precision_changes"],
                                         **window_means(out / f"{arm}_s{seed}", args.start)}
    print(f"\n{'arm':<14} {'seed':>4} {'k3 KL before':>13} {'k3 KL after':>12} {'masked after':>13} "
          f"{'|dlogp| after':>14} {'reward':>7}  rollout-side change")
    for r in results.values():
        b, a = r["before"], r["after"]
        change = [(c["step"], list(c["layers"].values())) for c in r["changes"]]
        print(f"{r['arm']:<14} {r['seed']:>4} {b['rollout_corr/k3_kl']:>13.2e} {a['rollout_corr/k3_kl']:>12.2e} "
              f"{a['rl/masked_fraction']:>13.2%} {a['train_rollout_logprob_abs_diff']:>14.4f} "
              f"{r['reward_final']:>7.3f}  {change}")
    (out / "follow_demo.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out / 'follow_demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
