"""Train the tiny LM once per precision mode on the same config; print a table and write JSON.

    python tools/lm_precision_table.py [--config configs/lm_tiny_cpu.toml] [--out runs/lm_precision_table]
        [--set key=value ...]

Each mode runs in its own process (a fresh torch.distributed world), one after the other on the same machine.
"""

import argparse
import json
import sys

from _arms import fresh_dir, run_arm

MODES = ("bf16", "fp8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/lm_tiny_cpu.toml")
    p.add_argument("--out", default="runs/lm_precision_table")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    out = fresh_dir(args.out)
    rows = {mode: run_arm(args.config, out / mode, [f'precision.mode="{mode}"', *args.overrides]) for mode in MODES}
    base = rows["bf16"]
    table = {
        mode: {"final_eval_loss": s["final_eval_loss"], "final_train_loss": s["final_train_loss"],
               "steps_per_s": s["steps_per_s"], "fp8_flop_fraction": s["fp8_flop_fraction"],
               "eval_loss_gap_vs_bf16": s["final_eval_loss"] - base["final_eval_loss"],
               "relative_gap_vs_bf16": (s["final_eval_loss"] - base["final_eval_loss"]) / base["final_eval_loss"]}
        for mode, s in rows.items()
    }
    result = {"config": args.config, "overrides": args.overrides, "steps": base["steps"],
              "unigram_baseline_loss": base["unigram_baseline_loss"], "modes": table}
    (out / "lm_precision_table.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nheld-out loss, {base['steps']} steps (unigram baseline {base['unigram_baseline_loss']:.4f})")
    print(f"{'mode':<6} {'eval loss':>10} {'gap vs bf16':>12} {'steps/s':>8} {'fp8 FLOPs':>10}")
    for mode, r in table.items():
        print(f"{mode:<6} {r['final_eval_loss']:>10.4f} {r['relative_gap_vs_bf16']:>+11.2%} "
              f"{r['steps_per_s']:>8.2f} {r['fp8_flop_fraction']:>10.0%}")
    print(f"written: {out / 'lm_precision_table.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
