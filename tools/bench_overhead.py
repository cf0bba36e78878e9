"""Step-time overhead of dynamic mode (monitors, checks, shadow gradients) over static FP8, in one run.

    python tools/bench_overhead.py [--config configs/lm_tiny_cpu.toml] [--blocks 6] [--block-steps 20]
        [--json runs/bench_overhead.json] [--set key=value ...]

One process, one model: blocks of steps alternate between the two modes (static FP8 = the same runtime with
monitoring off, so no statistics are even computed) and the ratio of median step times is reported. Alternating
blocks cancel most of this noisy machine's drift. Check steps fall inside every dynamic block.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from precisionrt.config import load_config  # noqa: E402
from precisionrt.data import ByteCorpus  # noqa: E402
from precisionrt.megatron import build_gpt, init_parallel  # noqa: E402
from precisionrt.runtime import PrecisionRuntime  # noqa: E402
from precisionrt.train import LMConfig, lm_loss  # noqa: E402


def set_monitoring(rt: PrecisionRuntime, on: bool) -> None:
    rt.monitoring = on
    for layer in rt.layers.values():
        layer.numerics.collect = on
        layer.numerics.drain_stats()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/lm_tiny_cpu.toml")
    p.add_argument("--blocks", type=int, default=6, help="blocks per mode")
    p.add_argument("--block-steps", type=int, default=20)
    p.add_argument("--json", type=Path, default=Path("runs/bench_overhead.json"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(LMConfig, args.config, ['precision.mode="dynamic"', *args.overrides])
    init_parallel(1)
    torch.manual_seed(cfg.train.seed)
    model = build_gpt(cfg.model)
    rt = PrecisionRuntime(model, cfg.precision)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    corpus = ByteCorpus(cfg.data)
    times = {"static_fp8": [], "dynamic": []}
    step = 0
    for block in range(2 * args.blocks + 1):
        mode = "dynamic" if block % 2 else "static_fp8"
        set_monitoring(rt, mode == "dynamic")
        for _ in range(args.block_steps):
            step += 1
            t0 = time.perf_counter()
            lm_loss(model, corpus.train_batch(step, cfg.train.batch_size, cfg.model.seq_length, 0)).backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            if not rt.should_skip_step(norm):
                opt.step()
            opt.zero_grad(set_to_none=True)
            rt.end_step(step)
            if block > 0:  # the first block warms up
                times[mode].append(time.perf_counter() - t0)
        print(f"block {block:>2} {mode:<10} median step {statistics.median(times[mode] or [0]):.4f} s", flush=True)
    med = {m: statistics.median(t) for m, t in times.items()}
    result = {
        "config": args.config, "overrides": args.overrides, "check_interval": cfg.precision.monitor.check_interval,
        "shadow_every": cfg.precision.monitor.shadow_every, "layers": len(rt.layers),
        "median_step_time": med, "mean_step_time": {m: statistics.fmean(t) for m, t in times.items()},
        "steps_per_mode": len(times["dynamic"]), "ratio_dynamic_over_static": med["dynamic"] / med["static_fp8"],
        "switches_during_benchmark": sum(p == "bf16" for p in rt.precisions().values()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'mode':<12} {'median step (s)':>16} {'mean step (s)':>14}")
    for m in times:
        print(f"{m:<12} {med[m]:>16.4f} {result['mean_step_time'][m]:>14.4f}")
    print(f"ratio dynamic / static FP8: {result['ratio_dynamic_over_static']:.3f} (target <= 1.10)")
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
