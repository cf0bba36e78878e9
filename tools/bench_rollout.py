"""Generation speed of the rollout engine: completion tokens per second, FP8 vs BF16 rollout precision, each
with full recomputation at every step and with the KV cache (``rollout.kv_cache``).

    python tools/bench_rollout.py [--config configs/rl_tiny_cpu.toml] [--batches 20] [--json runs/bench_rollout.json]
        [--prompt-tokens N --new-tokens M --set model.seq_length=L]

Same process, same (untrained) policy, same prompts; the arms alternate batch by batch so the machine's drift
hits all. Batch = rl.prompts_per_step x rl.group_size prompts, as in training: the task's prompts, or with
``--prompt-tokens`` synthetic digit prompts of that length and ``--new-tokens`` new tokens (longer contexts,
as multi-turn episodes have).
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
from precisionrt.distributed.parallel import init_parallel  # noqa: E402
from rl.envs import make_task  # noqa: E402
from rl.inference.rollout import RolloutConfig, RolloutEngine  # noqa: E402
from rl.train import RLConfig  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/rl_tiny_cpu.toml")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--json", type=Path, default=Path("runs/bench_rollout.json"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--prompt-tokens", type=int, default=0, help="synthetic prompts of this length (0: the task's)")
    p.add_argument("--new-tokens", type=int, default=0, help="with --prompt-tokens: tokens to generate")
    args = p.parse_args()
    cfg = load_config(RLConfig, args.config, args.overrides)
    init_parallel(1)
    torch.manual_seed(0)
    engines = {f"{prec}{'+kv' if kv else ''}": RolloutEngine(cfg.model, RolloutConfig(
        precision=prec, temperature=cfg.rollout.temperature, kv_cache=kv))
        for prec in ("fp8", "bf16") for kv in (False, True)}
    state = engines["fp8"].model.state_dict()
    for engine in engines.values():
        engine.model.load_state_dict(state)
    task = make_task(cfg.task)
    rng = random.Random(0)
    n = cfg.rl.prompts_per_step * cfg.rl.group_size
    new_tokens = args.new_tokens if args.prompt_tokens else task.max_completion_tokens
    rates = {name: [] for name in engines}
    for i in range(args.batches + 1):
        prompts = [bytes(rng.choice(b"0123456789") for _ in range(args.prompt_tokens)) if args.prompt_tokens
                   else task.sample(rng).prompt for _ in range(n)]
        for name, engine in engines.items():
            t0 = time.perf_counter()
            comps = engine.generate(prompts, new_tokens, torch.Generator().manual_seed(i))
            dt = time.perf_counter() - t0
            if i > 0:  # first batch warms up
                rates[name].append(sum(len(c.tokens) for c in comps) / dt)
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {"config": args.config, "batch_prompts": n, "batches": args.batches, "prompt_tokens":
              args.prompt_tokens or "task", "new_tokens": new_tokens, "tokens_per_s_median": med,
              "fp8_over_bf16": med["fp8"] / med["bf16"],
              "kv_cache_speedup": {p: med[f"{p}+kv"] / med[p] for p in ("fp8", "bf16")}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in med.items():
        print(f"{name:<8} {r:>10.0f} completion tokens/s (median of {args.batches} batches of {n})")
    print(f"fp8 / bf16: {result['fp8_over_bf16']:.2f}  (on CPU the float8 GEMM is slower than BF16: no claim for GPUs)")
    speedups = ", ".join(f"{p} {v:.2f}x" for p, v in result["kv_cache_speedup"].items())
    print(f"KV cache over full recomputation: {speedups}")
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
