"""GPU benchmark at the shapes users train: FP8 against BF16, eager, compiled and CUDA graphs, beside the peers.

    python tools/bench_gpu.py [--out bench_gpu.json] [--models llama8b] [--steps 20] [--iters 20]
        [--skip-layers] [--skip-model] [--skip-memory] [--device cuda] [--quick] [--backend inductor]

One process; prints tables and writes every number to JSON. Rehearse it anywhere with ``--device cpu --quick``
(small shapes, ``aot_eager``; times there mean nothing), so that on a GPU only the device is new.

1. Layer fwd+bwd at Llama-3-8B's linear shapes (hidden 4096, ffn 14336, GQA 32/8; 8192 tokens, bf16
   activations): torch BF16 (eager, compiled), precisionrt BF16, FP8 without / with cheap / with full
   statistics (eager: the fused Triton kernels), FP8 compiled, torchao float8 tensorwise compiled.
2. Whole training step (forward, backward, clipping, fused AdamW) of an 8-layer model at hidden 4096 (``llama8b``:
   ffn 14336, GQA 32/8, seq 4096, micro-batch 1, vocab 32000, RoPE, bf16 parameters; ``h2048``: the earlier
   anchor): plain torch BF16 eager and compiled, torchao float8 tensorwise compiled (head in BF16), and
   precisionrt's megatron model in BF16, static FP8 and dynamic mode, each eager, compiled
   (``compile_model``, per block) and with CUDA graphs (``CapturedStep``).
3. Host synchronisations of ordinary and check steps in dynamic mode (eager).
4. Activation memory held after forward, BF16 against FP8.
5. The targets of issue 25, each with its measured value.
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

from _torch_llama import TorchGPT  # noqa: E402

MODELS = {"llama8b": dict(hidden=4096, heads=32, groups=8, ffn=14336, seq=4096, batch=1, layers=8, vocab=32000),
          "h2048": dict(hidden=2048, heads=16, groups=16, ffn=5632, seq=2048, batch=4, layers=8, vocab=32000)}
QUICK = dict(hidden=128, heads=4, groups=2, ffn=256, seq=64, batch=2, layers=2, vocab=256)


def layer_shapes(m: dict) -> dict[str, tuple[int, int]]:
    kv = 2 * m["groups"] * (m["hidden"] // m["heads"])
    return {"qkv": (m["hidden"], m["hidden"] + kv), "proj": (m["hidden"], m["hidden"]),
            "fc1": (m["hidden"], 2 * m["ffn"]), "fc2": (m["ffn"], m["hidden"])}


def timed(fn, iters: int, device: torch.device, warmup: int = 3) -> tuple[list[float], list[float]]:
    """Per-iteration ms (CUDA events on a GPU) and the host's ms to issue each (close to the GPU time: launch
    bound)."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end))
        else:
            gpu.append(host[-1])
    return gpu, host


def torchao_convert():
    try:
        from torchao.float8 import convert_to_float8_training
        return convert_to_float8_training, None
    except ImportError as e:
        return None, f"torchao not installed ({e})"


def layer_table(args, shapes: dict, tokens: int) -> dict:
    from precisionrt.numerics.fp8 import ScalingConfig
    from precisionrt.layers.linear import LayerNumerics, PrecisionLinearFunction

    dev = args.device

    def ours(precision: str, collect: bool, full: bool):
        numerics = LayerNumerics(ScalingConfig(), dev)
        numerics.collect, numerics.full_stats = collect, full
        return lambda x, w: PrecisionLinearFunction.apply(x, w, None, numerics, precision, False, False, None)

    arms = {"torch_bf16": ("eager", lambda x, w: F.linear(x, w)),
            "torch_bf16_compiled": ("compiled", torch.compile(lambda x, w: F.linear(x, w), backend=args.backend)),
            "prt_bf16": ("eager", ours("bf16", False, False)),
            "fp8_no_stats": ("eager", ours("fp8", False, False)),
            "fp8_cheap_stats": ("eager", ours("fp8", True, False)),
            "fp8_full_stats": ("eager", ours("fp8", True, True)),
            "fp8_compiled": ("compiled", torch.compile(ours("fp8", False, False), backend=args.backend))}
    convert, ao_error = torchao_convert()
    rows = {}
    for name, (k, n) in shapes.items():
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
        w = (torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) * 0.02).requires_grad_()
        dy = torch.randn(tokens, n, device=dev, dtype=torch.bfloat16, generator=g)
        row = {}
        for arm, (execution, fn) in arms.items():
            def step(fn=fn):
                x.grad = w.grad = None
                fn(x, w).backward(dy)
            gpu, host = timed(step, args.iters, dev, warmup=5)
            row[arm] = {"exec": execution, "ms": statistics.median(gpu), "host_ms": statistics.median(host)}
        if convert is not None:
            lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
            lin.weight.data.copy_(w.detach())
            convert(lin)
            compiled = torch.compile(lin, backend=args.backend)

            def ao_step():
                x.grad = lin.weight.grad = None
                compiled(x).backward(dy)
            gpu, host = timed(ao_step, args.iters, dev, warmup=5)
            row["torchao_fp8_compiled"] = {"exec": "compiled", "ms": statistics.median(gpu),
                                           "host_ms": statistics.median(host)}
        rows[name] = row
        print(f"  layer {name}: " + ", ".join(f"{a} {r['ms']:.2f} ms" for a, r in row.items()), flush=True)
    return {"tokens": tokens, "rows": rows, "torchao_error": ao_error}


def model_config(args, m: dict):
    """precisionrt's ``ModelConfig`` of a benchmark shape."""
    from precisionrt.models.gpt import ModelConfig

    dims = dict(num_layers=m["layers"], hidden_size=m["hidden"], num_attention_heads=m["heads"],
                ffn_hidden_size=m["ffn"], seq_length=m["seq"], vocab_size=m["vocab"], params_dtype="bfloat16")
    if m["groups"] != m["heads"]:   # grouped-query attention: Llama's own architecture (precisionrt.layers.rope)
        return ModelConfig(**dims, hf_init="llama", num_query_groups=m["groups"])
    # the earlier anchor: megatron's GPT with its RoPE (CUDA only)
    return ModelConfig(**dims, position_embedding="rope" if args.device.type == "cuda" else "learned_absolute")


def megatron_arm(args, m: dict, mode: str, execution: str, run_dir: Path, runtime=None):
    """(step, runtime, step counter, model) of precisionrt's megatron model: forward, backward, clip, fused AdamW,
    ``end_step``. ``runtime``: a ``RuntimeConfig`` (default: ``mode``'s)."""
    from precisionrt.distributed.compile import compile_model
    from precisionrt.distributed.cuda_graphs import CapturedStep
    from precisionrt.models.gpt import build_gpt
    from precisionrt.runtime.precision_runtime import PrecisionRuntime, RuntimeConfig
    from precisionrt.train import lm_loss

    torch.manual_seed(0)
    model = build_gpt(model_config(args, m), device=args.device)
    rt = PrecisionRuntime(model, runtime or RuntimeConfig(mode=mode), run_dir=run_dir / f"{mode}_{execution}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)   # skips on the device
    if execution == "compiled":
        compile_model(model, "block", backend=args.backend)

    def forward_backward(tokens):
        loss = lm_loss(model, tokens)
        loss.backward()
        return loss
    run = CapturedStep(forward_backward, rt, model.parameters()) if execution == "graphs" else forward_backward
    counter = {"n": 0}

    def step():
        counter["n"] += 1
        run(args.batch)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        rt.skip_on_device(norm, opt, counter["n"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        rt.end_step(counter["n"])
    return step, rt, counter, model


def torch_arm(args, m: dict, kind: str):
    """``kind``: torch_eager, torch_compiled, torchao (every linear but the head in float8 tensorwise) or
    torchao_filtered (torchao's own auto filter for the tensorwise recipe: it keeps small layers in BF16)."""
    torch.manual_seed(0)
    model = TorchGPT(m["layers"], m["hidden"], m["heads"], m["groups"], m["ffn"], m["vocab"], m["seq"])
    model = model.to(device=args.device, dtype=torch.bfloat16)
    if kind.startswith("torchao"):
        convert, error = torchao_convert()
        if convert is None:
            return None, error
        keep = lambda mod, fqn: fqn != "head"   # noqa: E731
        if kind == "torchao_filtered":
            try:
                from torchao.float8 import _auto_filter_for_recipe
            except ImportError as e:
                return None, f"torchao has no auto filter ({e})"
            keep = _auto_filter_for_recipe("tensorwise", ["head"])
        convert(model, module_filter_fn=keep)
    run = torch.compile(model, backend=args.backend) if kind != "torch_eager" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)

    def step():
        run(args.batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, None


def model_table(args, m: dict, run_dir: Path) -> dict:
    args.batch = torch.randint(0, m["vocab"], (m["batch"], m["seq"] + 1), device=args.device)
    arms = [("torch", "bf16", "eager"), ("torch", "bf16", "compiled"), ("torchao", "fp8", "compiled")]
    arms += [("precisionrt", mode, ex) for mode in ("bf16", "fp8", "dynamic") for ex in ("eager", "compiled", "graphs")]
    out = {}
    for who, mode, execution in arms:
        name = f"{who}_{mode}_{execution}"
        rt = None
        if who == "precisionrt":
            step, rt, counter, _ = megatron_arm(args, m, mode, execution, run_dir)
        else:
            step, error = torch_arm(args, m, {"bf16": "torch_eager" if execution == "eager" else "torch_compiled",
                                              "fp8": "torchao"}[mode])
            if step is None:
                out[name] = {"error": error}
                continue
        gpu, host = timed(step, args.steps, args.device, warmup=args.warmup)   # warm-up: compile, capture
        out[name] = {"who": who, "mode": mode, "exec": execution, "median_ms": statistics.median(gpu),
                     "mean_ms": statistics.fmean(gpu), "host_ms": statistics.median(host)}
        if who == "precisionrt" and mode == "dynamic" and execution == "eager":
            out["host_syncs"] = host_syncs(args, step, rt, counter)
        print(f"  model {name}: median {out[name]['median_ms']:.1f} ms", flush=True)
        if rt is not None:
            rt.close(counter["n"])
        del step, rt
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def host_syncs(args, step, rt, counter) -> dict:
    """Synchronising calls of an ordinary and of a check step (host reads, on the CPU)."""
    from precisionrt.distributed.syncs import HostReads, host_syncs as cuda_syncs

    def count(fn) -> list[str]:
        if args.device.type == "cuda":
            return cuda_syncs(fn)
        with HostReads() as reads:
            fn()
        return [site for _, site in reads.sites]
    interval = rt.config.monitor.check_interval
    while (counter["n"] + 1) % interval == 0 or (counter["n"] + 1) % rt.config.monitor.full_stats_every == 0:
        step()
    count(lambda: None)   # the first switch into "warn" mode reports itself once
    ordinary = count(step)
    while (counter["n"] + 1) % interval:
        step()
    check = count(step)
    return {"ordinary_step": len(ordinary), "check_step": len(check), "where": {"ordinary": ordinary, "check": check}}


def activation_memory(args, m: dict, run_dir: Path) -> dict:
    """Memory held between forward and backward (what a step keeps for backward), BF16 against FP8."""
    from precisionrt.train import lm_loss

    out = {}
    for mode in ("bf16", "fp8"):
        step, rt, counter, model = megatron_arm(args, m, mode, "eager", run_dir / "mem")
        step()   # warm-up
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = lm_loss(model, args.batch)
        torch.cuda.synchronize()
        out[mode] = {"held_bytes": torch.cuda.memory_allocated() - before}
        loss.backward()
        rt.close(counter["n"])
        print(f"  memory {mode}: held after forward {out[mode]['held_bytes'] / 2**30:.2f} GiB", flush=True)
        del step, rt, model, loss
        torch.cuda.empty_cache()
    out["fp8_over_bf16"] = out["fp8"]["held_bytes"] / out["bf16"]["held_bytes"]
    return out


def best(rows: dict, who: str, mode: str) -> tuple[float, str]:
    """The fastest execution (eager, compiled, graphs) of an arm: (median ms, execution)."""
    found = [(r["median_ms"], r["exec"]) for r in rows.values()
             if isinstance(r, dict) and r.get("who") == who and r.get("mode") == mode]
    return min(found) if found else (float("nan"), "-")


def targets(report: dict) -> list[dict]:
    """Issue 25's targets with what was measured (a ratio < 1 of times is a speed-up of its inverse)."""
    out = []
    layers = report.get("layers", {}).get("rows", {})
    if "fc1" in layers:
        fc1 = layers["fc1"]
        fp8 = min(fc1[a]["ms"] for a in ("fp8_no_stats", "fp8_compiled"))
        out.append({"what": "layer fp8 / bf16 speed-up, fc1", "target": ">= 1.6x",
                    "value": fc1["torch_bf16"]["ms"] / fp8, "met": fc1["torch_bf16"]["ms"] / fp8 >= 1.6})
        if "torchao_fp8_compiled" in fc1:
            ao = fc1["torchao_fp8_compiled"]["ms"]
            out.append({"what": "layer fc1 against torchao (ours / theirs)", "target": "< 1", "value": fp8 / ao,
                        "met": fp8 < ao})
    for name, rows in report.get("models", {}).items():
        fp8, fp8_exec = best(rows, "precisionrt", "fp8")
        bf16, _ = best(rows, "precisionrt", "bf16")
        dyn, _ = best(rows, "precisionrt", "dynamic")
        out.append({"what": f"{name}: whole step fp8 / bf16 (best execution: {fp8_exec})", "target": "<= 0.80",
                    "value": fp8 / bf16, "met": fp8 / bf16 <= 0.80})
        out.append({"what": f"{name}: dynamic / static", "target": "<= 1.03", "value": dyn / fp8,
                    "met": dyn / fp8 <= 1.03})
        ao = rows.get("torchao_fp8_compiled", {})
        if "median_ms" in ao:
            out.append({"what": f"{name}: whole step against torchao (ours / theirs)", "target": "< 1",
                        "value": fp8 / ao["median_ms"], "met": fp8 < ao["median_ms"]})
        syncs = rows.get("host_syncs")
        if syncs:
            out.append({"what": f"{name}: host syncs ordinary / check", "target": "0 / 1",
                        "value": f"{syncs['ordinary_step']} / {syncs['check_step']}",
                        "met": (syncs["ordinary_step"], syncs["check_step"]) == (0, 1)})
    return out


def print_tables(r: dict) -> None:
    if "layers" in r:
        rows = r["layers"]["rows"]
        arms = list(next(iter(rows.values())))
        print(f"\nLayer fwd+bwd, {r['layers']['tokens']} tokens, median ms (x: torch bf16 eager / this), {r['device']}")
        print("| layer | " + " | ".join(f"{a} ({rows[next(iter(rows))][a]['exec']})" for a in arms) + " |")
        print("|---" * (len(arms) + 1) + "|")
        for name, row in rows.items():
            base = row["torch_bf16"]["ms"]
            print(f"| {name} | " + " | ".join(f"{row[a]['ms']:.2f} ({base / row[a]['ms']:.2f}x)" if a in row else "-"
                                             for a in arms) + " |")
    for name, rows in r.get("models", {}).items():
        print(f"\nWhole step, {name} {r['shapes'][name]}, median ms (x: torch bf16 eager / this)")
        base = rows.get("torch_bf16_eager", {}).get("median_ms")
        print("| who | mode | execution | median ms | mean ms | host ms | x |")
        print("|---|---|---|---|---|---|---|")
        for arm, row in rows.items():
            if arm == "host_syncs":
                continue
            if "error" in row:
                print(f"| {arm} | | | {row['error']} | | | |")
                continue
            x = f"{base / row['median_ms']:.2f}x" if base else "-"
            print(f"| {row['who']} | {row['mode']} | {row['exec']} | {row['median_ms']:.1f} | {row['mean_ms']:.1f} | "
                  f"{row['host_ms']:.1f} | {x} |")
        if "host_syncs" in rows:
            print(f"host syncs: ordinary {rows['host_syncs']['ordinary_step']}, check {rows['host_syncs']['check_step']}")
    if "memory" in r:
        mem = r["memory"]
        print(f"\nactivation memory held after forward: bf16 {mem['bf16']['held_bytes'] / 2**30:.2f} GiB, fp8 "
              f"{mem['fp8']['held_bytes'] / 2**30:.2f} GiB, ratio {mem['fp8_over_bf16']:.3f}")
    print("\nTargets (issue 25)")
    for t in r["targets"]:
        value = t["value"] if isinstance(t["value"], str) else f"{t['value']:.3f}"
        print(f"  {t['what']:<58} target {t['target']:<8} measured {value:<9} {'met' if t['met'] else 'NOT met'}")


def add_device_options(ap: argparse.ArgumentParser, run_dir: str) -> None:
    """What every GPU benchmark takes: the device, a CPU rehearsal, the compile backend, the run directory."""
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small shapes: a rehearsal of every section")
    ap.add_argument("--backend", default=None, help="torch.compile backend (default: inductor; aot_eager on CPU)")
    ap.add_argument("--run-dir", default=run_dir)


def resolve_device(args: argparse.Namespace, prog: str) -> bool:
    """``args.device`` as a torch device and the backend for it; False, having said why, when CUDA was asked
    for and torch sees none."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: --device cuda, but torch sees no CUDA device (torch {torch.__version__}); rehearse with "
              "--device cpu --quick", file=sys.stderr)
        return False
    args.device = torch.device(args.device)
    args.backend = args.backend or ("inductor" if args.device.type == "cuda" else "aot_eager")
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument("--models", nargs="+", default=["llama8b"], choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=20, help="timed whole-model steps per arm")
    ap.add_argument("--warmup", type=int, default=12,
                    help="untimed steps per arm: compilation, graph capture and the first sampled step (10)")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per layer arm")
    ap.add_argument("--tokens", type=int, default=8192, help="layer table: tokens (2 sequences of 4096)")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    add_device_options(ap, "runs/bench_gpu")
    args = ap.parse_args()
    if not resolve_device(args, "bench_gpu.py"):
        return 2
    from precisionrt.distributed.compile import compile_model  # noqa: F401  (raises dynamo's cache limit on first use)
    from precisionrt.distributed.parallel import init_parallel

    init_parallel(1, device=args.device)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    run_dir = Path(args.run_dir) / time.strftime("%Y%m%d-%H%M%S")
    name = torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__, "backend": args.backend, "quick": args.quick}
    print(f"device {name}, torch {torch.__version__}, compile backend {args.backend}", flush=True)
    shapes = {n: QUICK if args.quick else MODELS[n] for n in args.models}
    report["shapes"] = shapes
    if not args.skip_layers:
        first = next(iter(shapes.values()))
        report["layers"] = layer_table(args, layer_shapes(first), 256 if args.quick else args.tokens)
    if not args.skip_model:
        report["models"] = {n: model_table(args, m, run_dir) for n, m in shapes.items()}
        if args.device.type == "cuda" and not args.skip_memory:
            report["memory"] = activation_memory(args, next(iter(shapes.values())), run_dir)
    report["targets"] = targets(report)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_tables(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
