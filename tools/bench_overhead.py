"""Step-time overhead of dynamic mode (monitors, checks, shadow gradients) over static FP8, in one run, and the
aten operations each precisionrt linear adds to a training step.

    python tools/bench_overhead.py [--config configs/lm_tiny_cpu.toml] [--blocks 6] [--block-steps 20]
        [--json runs/bench_overhead.json] [--set key=value ...] [--ops-only]

One process, one model: blocks of steps alternate between the two modes (static FP8 = the same runtime with
monitoring off, so no statistics are even computed) and the ratio of median step times is reported. Alternating
blocks cancel most of this noisy machine's drift. Check steps fall inside every dynamic block.

Operation count (``TorchDispatchMode``: every aten operation one forward+backward dispatches, on a GPU each a
kernel launch or a view): megatron's own spec at the same shapes, then precisionrt in BF16, static FP8 and
dynamic mode (an ordinary step and a sampled one), each as the count and as operations added per linear.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from precisionrt.config import load_config  # noqa: E402
from precisionrt.run.data import ByteCorpus  # noqa: E402
from precisionrt.models.gpt import build_gpt, transformer_config  # noqa: E402
from precisionrt.distributed.parallel import init_parallel  # noqa: E402
from precisionrt.models.transformer import place_model  # noqa: E402
from precisionrt.layers.spec import precision_layer_spec  # noqa: E402
from precisionrt.runtime.precision_runtime import PrecisionRuntime  # noqa: E402
from precisionrt.train import LMConfig, lm_loss  # noqa: E402


def set_monitoring(rt: PrecisionRuntime, on: bool) -> None:
    rt.monitoring = on
    for layer in rt.layers.values():
        layer.numerics.collect = on
        layer.numerics.drain_stats()


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def count_ops(model, batch: torch.Tensor) -> int:
    """aten operations of one forward+backward (after a warm-up step)."""
    lm_loss(model, batch).backward()
    with OpCount() as counted:
        lm_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return counted.ops


def op_counts(cfg, batch: torch.Tensor) -> dict:
    """Operations per step: megatron's own linears, then precisionrt's in each mode, and per linear added."""
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(0)
    megatron = GPTModel(config=transformer_config(cfg.model), transformer_layer_spec=precision_layer_spec(
        precision=False), vocab_size=cfg.model.vocab_size, max_sequence_length=cfg.model.seq_length)
    place_model(megatron, cfg.model.torch_dtype, "cpu")
    out = {"megatron_spec": count_ops(megatron, batch)}
    for mode in ("bf16", "static_fp8", "dynamic", "dynamic_sampled"):
        torch.manual_seed(0)
        model = build_gpt(cfg.model)
        runtime_mode = {"bf16": "bf16", "static_fp8": "fp8"}.get(mode, "dynamic")
        rt = PrecisionRuntime(model, dataclasses.replace(cfg.precision, mode=runtime_mode))
        if mode in ("bf16", "static_fp8"):   # static: no monitors, no statistics
            set_monitoring(rt, False)
        rt.sampling.plan(cfg.precision.monitor.full_stats_every if mode == "dynamic_sampled" else 1)
        out[mode] = count_ops(model, batch)
        out["linears"] = len(rt.layers)
    per = {m: (out[m] - out["megatron_spec"]) / out["linears"] for m in ("bf16", "static_fp8", "dynamic",
                                                                          "dynamic_sampled")}
    return {"per_step": out, "added_per_linear": per}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/lm_tiny_cpu.toml")
    p.add_argument("--blocks", type=int, default=6, help="blocks per mode")
    p.add_argument("--block-steps", type=int, default=20)
    p.add_argument("--json", type=Path, default=Path("runs/bench_overhead.json"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--ops-only", action="store_true", help="only the operation count")
    args = p.parse_args()
    cfg = load_config(LMConfig, args.config, ['precision.mode="dynamic"', *args.overrides])
    init_parallel(1)
    corpus = ByteCorpus(cfg.data)
    ops = op_counts(cfg, corpus.train_batch(0, cfg.train.batch_size, cfg.model.seq_length, 0))
    print(f"aten operations per fwd+bwd step ({ops['per_step']['linears']} linears):")
    print(f"  megatron's own spec {ops['per_step']['megatron_spec']:>6}")
    for m, n in ops["added_per_linear"].items():
        print(f"  {m:<19} {ops['per_step'][m]:>6}  ({n:+.1f} per linear)")
    if args.ops_only:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "ops": ops}, indent=2) + "\n")
        print(f"written: {args.json}")
        return 0
    torch.manual_seed(cfg.train.seed)
    model = build_gpt(cfg.model)
    rt = PrecisionRuntime(model, cfg.precision)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
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
        "switches_during_benchmark": sum(p == "bf16" for p in rt.precisions().values()), "ops": ops,
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
