"""GPU benchmark: FP8 vs BF16 speed, statistics cost, host syncs and activation memory, in one process.

    python tools/bench_gpu.py [--out bench_gpu.json] [--steps 30] [--vocab 32000] [--skip-model]

Needs a CUDA GPU (refuses without one). Prints tables and writes every number to JSON:

1. Layer fwd+bwd at Llama-8B linear shapes (8192 tokens, bf16 activations): torch bf16 (``F.linear``),
   precisionrt bf16, precisionrt fp8 with no / cheap / full statistics (fused kernels), fp8 through the eager
   reference path, and torchao float8 (tensorwise, ``torch.compile``) when torchao is installed.
2. Whole-model training step (megatron GPT, 8 layers, hidden 2048, ffn 5632, 16 heads, seq 2048,
   micro-batch 4, bf16 parameters, fused AdamW, RoPE): bf16, static fp8, dynamic; median and mean.
3. Host synchronisations per ordinary and per check step in dynamic mode (``set_sync_debug_mode``).
4. Activation memory held after forward at micro-batch 8, bf16 vs fp8, and what holds it (saved tensors
   by dtype).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LAYER_SHAPES = {"qkv": (4096, 6144), "proj": (4096, 4096), "fc1": (4096, 28672), "fc2": (14336, 4096)}


def time_cuda(fn, iters: int, warmup: int = 3, host: list | None = None) -> list[float]:
    """Per-iteration milliseconds, each between CUDA events (after warm-up). With ``host``, also the host
    time to issue each iteration (when it is close to the GPU time, launches are the bottleneck)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        if host is not None:
            host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def layer_table(tokens: int, iters: int) -> dict:
    from precisionrt.fp8 import ScalingConfig
    from precisionrt.linear import LayerNumerics, PrecisionLinearFunction

    def ours(precision: str, collect: bool, full: bool, fused: bool = True):
        numerics = LayerNumerics(ScalingConfig(), "cuda")
        numerics.collect, numerics.full_stats, numerics.fused = collect, full, fused
        return lambda x, w: PrecisionLinearFunction.apply(x, w, None, numerics, precision, False, False, None)

    variants = {
        "torch_bf16": lambda x, w: F.linear(x, w),
        "prt_bf16": ours("bf16", False, False),
        "fp8_no_stats": ours("fp8", False, False),
        "fp8_cheap_stats": ours("fp8", True, False),
        "fp8_full_stats": ours("fp8", True, True),
        "fp8_eager_no_stats": ours("fp8", False, False, fused=False),
    }
    torchao_error = None
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        convert_to_float8_training, torchao_error = None, f"torchao not installed ({e})"
    results, host = {}, {}
    for name, (k, n) in LAYER_SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        w = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02).requires_grad_()
        dy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16, generator=g)
        row, host_row = {}, {}
        for vname, fn in variants.items():
            def step(fn=fn):
                x.grad = w.grad = None
                fn(x, w).backward(dy)
            host_ms: list[float] = []
            row[vname] = statistics.median(time_cuda(step, iters, host=host_ms))
            host_row[vname] = statistics.median(host_ms)
        if convert_to_float8_training is not None:
            lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            lin.weight.data.copy_(w.detach())
            convert_to_float8_training(lin)
            compiled = torch.compile(lin)

            def ao_step():
                x.grad = None
                lin.weight.grad = None
                compiled(x).backward(dy)
            row["torchao_fp8_compiled"] = statistics.median(time_cuda(ao_step, iters, warmup=5))
        results[name], host[name] = row, host_row
        print(f"  layer {name}: " + ", ".join(f"{k_} {v:.2f} ms (host {host_row.get(k_, 0):.2f})"
                                            for k_, v in row.items()), flush=True)
    return {"tokens": tokens, "ms": results, "host_ms": host, "torchao_error": torchao_error}


def build(mode: str, vocab: int, seq: int, layers: int, run_dir: Path):
    from precisionrt.megatron import ModelConfig, build_gpt
    from precisionrt.runtime import PrecisionRuntime, RuntimeConfig
    from precisionrt.train import TrainConfig, make_optimizer

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=layers, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632,
                      seq_length=seq, vocab_size=vocab, params_dtype="bfloat16", position_embedding="rope")
    model = build_gpt(cfg, device="cuda")
    rt = PrecisionRuntime(model, RuntimeConfig(mode=mode), run_dir=run_dir / mode)
    opt = make_optimizer(model, TrainConfig(lr=1e-4), torch.device("cuda"))
    return model, rt, opt


def model_step_fn(model, rt, opt, batch):
    from precisionrt.train import lm_loss

    counter = {"n": 0}

    def step():
        counter["n"] += 1
        loss = lm_loss(model, batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        rt.skip_on_device(norm, opt, counter["n"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        rt.end_step(counter["n"])
    return step, counter


def count_syncs(fn) -> tuple[int, list[str]]:
    from precisionrt.syncs import host_syncs

    where = host_syncs(fn)
    return len(where), where


def model_steps(args, run_dir: Path) -> dict:
    out = {}
    batch = torch.randint(0, args.vocab, (4, 2049), device="cuda")
    for mode in ("bf16", "fp8", "dynamic"):
        model, rt, opt = build(mode, args.vocab, 2048, 8, run_dir)
        step, counter = model_step_fn(model, rt, opt, batch)
        for _ in range(12):   # warm-up (compilation, allocator, a first check)
            step()
        torch.cuda.synchronize()
        times = time_cuda(step, args.steps, warmup=0)
        out[mode] = {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
                     "steps": len(times), "fp8_flop_fraction": rt.fp8_flop_fraction("step")}
        if mode == "dynamic":
            interval = rt.config.monitor.check_interval
            while (counter["n"] + 1) % interval == 0:
                step()
            count_syncs(lambda: None)   # the first switch into "warn" mode reports itself once
            ordinary, where_ordinary = count_syncs(step)
            while (counter["n"] + 1) % interval:
                step()
            check, where_check = count_syncs(step)
            out["host_syncs"] = {"ordinary_step": ordinary, "check_step": check,
                                 "where": {"ordinary": where_ordinary, "check": where_check}}
        print(f"  model {mode}: median {out[mode]['median_ms']:.1f} ms, mean {out[mode]['mean_ms']:.1f} ms",
              flush=True)
        rt.close(counter["n"])
        del model, rt, opt
        torch.cuda.empty_cache()
    return out


def activation_memory(args, run_dir: Path) -> dict:
    from precisionrt.train import lm_loss

    out = {}
    batch = torch.randint(0, args.vocab, (8, 2049), device="cuda")
    for mode in ("bf16", "fp8"):
        model, rt, opt = build(mode, args.vocab, 2048, 8, run_dir / "mem")
        params = {p.data_ptr() for p in model.parameters()}
        lm_loss(model, batch).backward()   # warm-up
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seen: dict[int, tuple[int, str]] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = (t.untyped_storage().nbytes(), str(t.dtype).replace("torch.", ""))
            return t

        before = torch.cuda.memory_allocated()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = lm_loss(model, batch)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        by_dtype: dict[str, int] = {}
        for nbytes, dtype in seen.values():
            by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
        out[mode] = {"held_bytes": held, "saved_by_dtype_bytes": by_dtype}
        loss.backward()
        print(f"  memory {mode}: held after forward {held / 2**30:.2f} GiB; saved by dtype "
              + ", ".join(f"{d} {b / 2**30:.2f} GiB" for d, b in sorted(by_dtype.items())), flush=True)
        rt.close(0)
        del model, rt, opt, loss
        torch.cuda.empty_cache()
    out["fp8_over_bf16"] = out["fp8"]["held_bytes"] / out["bf16"]["held_bytes"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument("--steps", type=int, default=30, help="timed whole-model steps per mode")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per layer variant")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--skip-model", action="store_true", help="layer table only")
    ap.add_argument("--run-dir", default="runs/bench_gpu")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU; torch sees none (torch "
              f"{torch.__version__}). Run it on a GPU machine.", file=sys.stderr)
        return 2
    from precisionrt.megatron import init_parallel

    init_parallel(1, device="cuda")
    run_dir = Path(args.run_dir) / time.strftime("%Y%m%d-%H%M%S")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(f"device {report['device']}, torch {report['torch']}", flush=True)
    report["layers"] = layer_table(args.tokens, args.iters)
    if not args.skip_model:
        report["model"] = model_steps(args, run_dir)
        report["memory"] = activation_memory(args, run_dir)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    print(f"wrote {args.out}")
    return 0


def print_tables(r: dict) -> None:
    ms = r["layers"]["ms"]
    cols = list(next(iter(ms.values())))
    print(f"\nLayer fwd+bwd, {r['layers']['tokens']} tokens, ms (x = torch bf16 / this), {r['device']}")
    print("| layer | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in ms.items():
        base = row["torch_bf16"]
        print(f"| {name} | " + " | ".join(f"{row[c]:.2f} ({base / row[c]:.2f}x)" for c in cols) + " |")
    if "model" in r:
        m = r["model"]
        print("\nWhole model step (8 layers, hidden 2048, seq 2048, micro-batch 4, bf16 params)")
        print("| mode | median ms | mean ms | vs bf16 (median) |")
        print("|---|---|---|---|")
        for mode in ("bf16", "fp8", "dynamic"):
            print(f"| {mode} | {m[mode]['median_ms']:.1f} | {m[mode]['mean_ms']:.1f} | "
                  f"{m[mode]['median_ms'] / m['bf16']['median_ms']:.2f} |")
        print(f"dynamic / fp8: median {m['dynamic']['median_ms'] / m['fp8']['median_ms']:.3f}, "
              f"mean {m['dynamic']['mean_ms'] / m['fp8']['mean_ms']:.3f}")
        print(f"host syncs: {m['host_syncs']}")
        mem = r["memory"]
        print(f"activation memory held after forward (micro-batch 8): bf16 {mem['bf16']['held_bytes'] / 2**30:.2f} "
              f"GiB, fp8 {mem['fp8']['held_bytes'] / 2**30:.2f} GiB, ratio {mem['fp8_over_bf16']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
