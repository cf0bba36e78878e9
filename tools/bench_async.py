"""Samples per second of asynchronous vs synchronous RL on the same configuration, one after the other.

    python tools/bench_async.py [--config configs/rl_tiny_cpu.toml] [--out runs/bench_async] [--set key=value ...]
    python tools/bench_async.py --config configs/rl_agent_cpu.toml --out runs/bench_async_agent

Prints the table (samples/s, trainer, rollout and, for multi-turn tasks, environment idle ratios, held-out
reward) and writes bench_async.json. Both arms run the full job (warm start included); samples/s counts the
RL phase only. Idle ratios: the trainer waiting for samples, the rollout engine not decoding, no tool call in
flight.
"""

import argparse
import json
import sys

from _arms import fresh_dir, run_arm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/rl_tiny_cpu.toml")
    p.add_argument("--out", default="runs/bench_async")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    out = fresh_dir(args.out)
    runs = {mode: run_arm(args.config, out / mode, [f'executor.mode="{mode}"', *args.overrides], module="rl.train")
            for mode in ("sync", "async")}
    keys = ("samples_per_s", "trainer_idle_ratio", "rollout_idle_ratio", "reward_initial", "reward_final",
            "max_staleness_trained", "icepop_masked_fraction")
    table = {mode: {**{k: s[k] for k in keys}, "env_idle_ratio": s.get("env_idle_ratio")} for mode, s in runs.items()}
    ratio = table["async"]["samples_per_s"] / table["sync"]["samples_per_s"]
    (out / "bench_async.json").write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                                      "arms": table, "async_over_sync": ratio}, indent=2) + "\n")
    print(f"\n{'mode':<6} {'samples/s':>10} {'trainer idle':>13} {'rollout idle':>13} {'env idle':>9} {'reward':>15}")
    for mode, r in table.items():
        env = "-" if r["env_idle_ratio"] is None else f"{r['env_idle_ratio']:.1%}"
        print(f"{mode:<6} {r['samples_per_s']:>10.1f} {r['trainer_idle_ratio']:>13.1%} {r['rollout_idle_ratio']:>13.1%}"
              f" {env:>9} {r['reward_initial']:>7.3f}->{r['reward_final']:.3f}")
    print(f"async / sync samples per second: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
