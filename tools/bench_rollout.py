"""Generation speed of the rollout engine: completion tokens per second, FP8 vs BF16 rollout precision.

    python tools/bench_rollout.py [--config configs/rl_tiny_cpu.toml] [--batches 20] [--json runs/bench_rollout.json]

Same process, same (untrained) policy, same prompts; the two precisions alternate batch by batch so the
machine's drift hits both. Batch = rl.prompts_per_step x rl.group_size prompts, as in training.
"""

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from precisionrt.config import load_config  # noqa: E402
from precisionrt.megatron import init_parallel  # noqa: E402
from rl.envs import ReverseDigits  # noqa: E402
from rl.rollout import RolloutConfig, RolloutEngine  # noqa: E402
from rl.train import RLConfig  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/rl_tiny_cpu.toml")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--json", type=Path, default=Path("runs/bench_rollout.json"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(RLConfig, args.config, args.overrides)
    init_parallel(1)
    torch.manual_seed(0)
    engines = {prec: RolloutEngine(cfg.model, RolloutConfig(precision=prec, temperature=cfg.rollout.temperature))
               for prec in ("fp8", "bf16")}
    engines["bf16"].model.load_state_dict(engines["fp8"].model.state_dict())
    task = ReverseDigits(cfg.task)
    rng = random.Random(0)
    n = cfg.rl.prompts_per_step * cfg.rl.group_size
    rates = {prec: [] for prec in engines}
    for i in range(args.batches + 1):
        prompts = [task.sample(rng).prompt for _ in range(n)]
        for prec, engine in engines.items():
            t0 = time.perf_counter()
            comps = engine.generate(prompts, task.max_completion_tokens, torch.Generator().manual_seed(i))
            dt = time.perf_counter() - t0
            if i > 0:  # first batch warms up
                rates[prec].append(sum(len(c.tokens) for c in comps) / dt)
    result = {"config": args.config, "batch_prompts": n, "batches": args.batches,
              "tokens_per_s_median": {k: statistics.median(v) for k, v in rates.items()}}
    result["fp8_over_bf16"] = result["tokens_per_s_median"]["fp8"] / result["tokens_per_s_median"]["bf16"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for prec, r in result["tokens_per_s_median"].items():
        print(f"{prec:<5} {r:>10.0f} completion tokens/s (median of {args.batches} batches of {n})")
    print(f"fp8 / bf16: {result['fp8_over_bf16']:.2f}  (on CPU the float8 GEMM is slower than BF16: no claim for GPUs)")
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
