"""The speed plan on a GPU (issue 38, item 7): the speed table and whole training steps of plan "speed" against
BF16, static FP8 and torchao float8 with its own auto filter, at three sizes, in one run.

    python tools/bench_speed_plan.py [--out bench_speed_plan.json] [--models h2048 qwen05b llama8b]
        [--steps 20] [--warmup 12] [--device cuda] [--quick] [--run-dir runs/bench_speed_plan]

For each model (``bench_gpu.MODELS``: an 8-layer model at that model's layer shapes): measure the speed table
(``precisionrt.speed``: 8 GEMM assignments per layer shape, eager, as the step arms run), then time whole steps
(forward, backward, clipping, fused AdamW, ``end_step``): plain torch BF16 eager, torchao float8 tensorwise
compiled with ``_auto_filter_for_recipe`` (its shape rule), and precisionrt's megatron model in BF16, static FP8
and dynamic mode under plan "speed", eager. Targets: plan speed / BF16 <= 1.00 at every size, <= 0.80 at
Llama-3-8B's shapes, and faster than torchao with its filter. Rehearse anywhere with ``--device cpu --quick``
(tiny shapes; times there mean nothing).
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

from bench_gpu import (MODELS, QUICK, add_device_options, megatron_arm, model_config, resolve_device,  # noqa: E402
                       timed, torch_arm)

MODELS = {**MODELS, "qwen05b": dict(hidden=896, heads=14, groups=2, ffn=4864, seq=2048, batch=4, layers=8,
                                    vocab=151936)}
ARMS = [("torch", "bf16_eager"), ("torchao", "filtered_compiled"), ("precisionrt", "bf16"),
        ("precisionrt", "fp8"), ("precisionrt", "speed")]


def speed_table(args, m: dict, path: Path) -> dict:
    from precisionrt import speed
    from precisionrt.config import to_dict

    tree = {"model": to_dict(model_config(args, m)), "run": {"device": args.device.type},
            "precision": {"mode": "dynamic"}}
    table = speed.measure(tree, m["batch"] * m["seq"], args.iters, 3, compiled=False)
    path.write_text(json.dumps(table, indent=1))
    return table


def model_rows(args, name: str, m: dict, run_dir: Path) -> dict:
    from precisionrt.runtime.precision_runtime import RuntimeConfig

    args.batch = torch.randint(0, m["vocab"], (m["batch"], m["seq"] + 1), device=args.device)
    table_path = run_dir / f"{name}_speed_table.json"
    rows = {"speed_table": speed_table(args, m, table_path)}
    for who, arm in ARMS:
        rt = None
        if who == "precisionrt":
            runtime = RuntimeConfig(mode="dynamic", plan="speed", speed_table=str(table_path)) if arm == "speed" \
                else RuntimeConfig(mode=arm)
            step, rt, counter, _ = megatron_arm(args, m, arm, "eager", run_dir, runtime)
            error = None
        else:
            step, error = torch_arm(args, m, "torch_eager" if who == "torch" else "torchao_filtered")
        if step is None:
            rows[f"{who}_{arm}"] = {"error": error}
            print(f"  {name} {who}_{arm}: {error}", flush=True)
            continue
        gpu, _ = timed(step, args.steps, args.device, warmup=args.warmup)
        rows[f"{who}_{arm}"] = {"median_ms": statistics.median(gpu)}
        if rt is not None:
            if rt.speed_plan is not None:
                rows[f"{who}_{arm}"]["plan"] = rt.speed_plan.summary()
            rows[f"{who}_{arm}"]["fp8_flop_fraction"] = rt.fp8_flop_fraction()
            rt.close(counter["n"])
        print(f"  {name} {who}_{arm}: median {rows[f'{who}_{arm}']['median_ms']:.1f} ms", flush=True)
        del step, rt
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def targets(report: dict) -> list[dict]:
    out = []
    for name, rows in report["models"].items():
        ms = {k: r.get("median_ms") for k, r in rows.items() if isinstance(r, dict)}
        plan, bf16 = ms.get("precisionrt_speed"), ms.get("precisionrt_bf16")
        if plan and bf16:
            out.append({"what": f"{name}: plan speed / precisionrt BF16", "target": "<= 1.00", "value": plan / bf16,
                        "met": plan / bf16 <= 1.00})
            if name == "llama8b":
                out.append({"what": f"{name}: plan speed / precisionrt BF16", "target": "<= 0.80",
                            "value": plan / bf16, "met": plan / bf16 <= 0.80})
        if plan and ms.get("torchao_filtered_compiled"):
            ao = ms["torchao_filtered_compiled"]
            out.append({"what": f"{name}: plan speed / torchao filtered", "target": "< 1", "value": plan / ao,
                        "met": plan < ao})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_speed_plan.json")
    ap.add_argument("--models", nargs="+", default=["h2048", "qwen05b", "llama8b"], choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--iters", type=int, default=10, help="repeats per speed-table entry")
    add_device_options(ap, "runs/bench_speed_plan")
    args = ap.parse_args()
    if not resolve_device(args, "bench_speed_plan.py"):
        return 2
    if args.quick:
        args.steps, args.warmup, args.iters = 2, 1, 1
    from precisionrt.distributed.parallel import init_parallel

    init_parallel(1, device=args.device)
    run_dir = Path(args.run_dir) / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    name = torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__, "quick": args.quick, "models": {}}
    shapes = {n: {**QUICK, "vocab": 256} if args.quick else MODELS[n] for n in args.models}
    report["shapes"] = shapes
    for n, m in shapes.items():
        report["models"][n] = model_rows(args, n, m, run_dir)
    report["targets"] = targets(report)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nWhole step, median ms ({name}; x: precisionrt BF16 / this)")
    print("| model | " + " | ".join(f"{w} {a}" for w, a in ARMS) + " |")
    print("|---" * (len(ARMS) + 1) + "|")
    for n, rows in report["models"].items():
        base = rows.get("precisionrt_bf16", {}).get("median_ms")
        cells = []
        for w, a in ARMS:
            r = rows.get(f"{w}_{a}", {})
            cells.append(r.get("error", "-")[:30] if "median_ms" not in r else
                         f"{r['median_ms']:.1f} ({base / r['median_ms']:.2f}x)" if base else f"{r['median_ms']:.1f}")
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\nTargets (issue 38)")
    for t in report["targets"]:
        print(f"  {t['what']:<48} target {t['target']:<8} measured {t['value']:.3f} {'met' if t['met'] else 'NOT met'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
