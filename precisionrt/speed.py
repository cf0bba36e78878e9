"""Measure the speed table that ``precision.plan = "speed"`` runs from (``precisionrt/runtime/speed_plan.py``).

    python -m precisionrt.speed --config FILE [--set dotted.key=value ...] --out TABLE.json
                                [--tokens N] [--repeats R] [--compile]

For every distinct linear-layer shape of the configured model (``[model]``, one tensor-parallel shard of
``parallel.tensor_model_parallel_size``), times one forward and backward of precisionrt's own linear
(``PrecisionLinearFunction``: quantization, statistics as an ordinary step gathers them, layout copies, the GEMMs)
for each of the 8 assignments of FP8/BF16 to fprop, dgrad and wgrad, on this device, eager or compiled as the
run will be, and writes the medians with the device's name and torch's version. Only the tables this command
reads are looked at; a run configuration of either command (LM or RL) works as it is.

The token count of a forward (the GEMMs' M) is ``--tokens``, else the configuration's: ``train.batch_size x
model.seq_length / train.micro_batches`` (LM), ``rl.prompts_per_step x rl.group_size x model.seq_length`` (RL).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tomllib
from pathlib import Path

import torch

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from precisionrt.config import ConfigError, apply_override, from_dict
from precisionrt.distributed.parallel import resolve_device
from precisionrt.layers.linear import PrecisionLinearFunction
from precisionrt.models.gpt import ModelConfig, gemm_shapes
from precisionrt.numerics.state import LayerNumerics
from precisionrt.runtime.precision_runtime import RuntimeConfig
from precisionrt.runtime.speed_plan import ASSIGNMENTS, TABLE_VERSION, assignment_key, device_name
from precisionrt.run.rundir import RunConfig, write_json


def run_tokens(tree: dict, model: ModelConfig) -> int:
    """The tokens of one training forward, as the run configuration ``tree`` sets them."""
    train, rl = tree.get("train", {}), tree.get("rl", {})
    if "prompts_per_step" in rl or "group_size" in rl:
        return int(rl.get("prompts_per_step", 32)) * int(rl.get("group_size", 8)) * model.seq_length
    return int(train.get("batch_size", 16)) * model.seq_length // int(train.get("micro_batches", 1))


def time_layer(k: int, n: int, m: int, assignment: tuple[str, ...], dtype: torch.dtype, device: torch.device,
               runtime: RuntimeConfig, repeats: int, warmup: int, compiled: bool) -> float:
    """Median milliseconds of one forward + backward of a (K, N) linear on M tokens, GEMMs in ``assignment``."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(device, dtype).requires_grad_(True)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(device, dtype).requires_grad_(True)
    g = (torch.randn(m, n, generator=gen) * 1e-3).to(device, dtype)
    numerics = LayerNumerics(runtime.scaling, device)
    numerics.collect = runtime.mode == "dynamic" or runtime.observe   # as an ordinary step: cheap statistics
    numerics.full_stats = False
    numerics.fused = runtime.fused_kernels

    def step():
        x.grad = w.grad = None
        PrecisionLinearFunction.apply(x, w, None, numerics, assignment, False, False, None).backward(g)

    fn = torch.compile(step) if compiled else step
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(tree: dict, tokens: int, repeats: int, warmup: int, compiled: bool) -> dict:
    model = from_dict(ModelConfig, tree.get("model", {}), "model.")
    runtime = from_dict(RuntimeConfig, tree.get("precision", {}), "precision.")
    run = from_dict(RunConfig, tree.get("run", {}), "run.")
    tp = int(tree.get("parallel", {}).get("tensor_model_parallel_size", 1))
    device = resolve_device(run.device)
    m = tokens or run_tokens(tree, model)
    shapes: dict[tuple[int, int], list[str]] = {}
    for layer, shape in gemm_shapes(model, tp).items():
        shapes.setdefault(shape, []).append(layer)
    table = {"version": TABLE_VERSION, "device": device_name(device), "torch": torch.__version__,
             "mode": "compiled" if compiled else "eager", "tokens": m, "dtype": str(model.torch_dtype).removeprefix("torch."),
             "tensor_parallel_size": tp, "repeats": repeats, "shapes": []}
    print(f"speed table on {table['device']} (torch {torch.__version__}, {table['mode']}), {m} tokens per forward, "
          f"{len(shapes)} shape(s); ms per forward + backward", flush=True)
    print(f"  {'layers':<28} {'K':>6} {'N':>6} {'all BF16':>9} {'all FP8':>9}  fastest (fprop dgrad wgrad)", flush=True)
    for (k, n), layers in shapes.items():
        ms = {assignment_key(a): time_layer(k, n, m, a, model.torch_dtype, device, runtime, repeats, warmup, compiled)
              for a in ASSIGNMENTS}
        best = min(ASSIGNMENTS, key=lambda a: ms[assignment_key(a)])
        table["shapes"].append({"k": k, "n": n, "layers": layers, "ms": ms})
        print(f"  {'+'.join(layers):<28} {k:>6} {n:>6} {ms[assignment_key(('bf16',) * 3)]:>9.3f} "
              f"{ms[assignment_key(('fp8',) * 3)]:>9.3f}  {' '.join(best)} {ms[assignment_key(best)]:.3f}", flush=True)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m precisionrt.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a run configuration (TOML) of either command")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="dotted.key=value")
    p.add_argument("--out", required=True, help="the table to write (JSON)")
    p.add_argument("--tokens", type=int, default=0, help="tokens per forward (default: the configuration's)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="time torch.compile'd layers, as a compiled run runs them")
    args = p.parse_args(argv)
    try:
        with open(args.config, "rb") as f:
            tree = tomllib.load(f)
        for assignment in args.overrides:
            apply_override(tree, assignment)
        if args.tokens < 0 or args.repeats < 1 or args.warmup < 0:
            raise ConfigError("--tokens must be >= 0, --repeats >= 1 and --warmup >= 0")
        table = measure(tree, args.tokens, args.repeats, args.warmup, args.compile)
    except (ConfigError, OSError, tomllib.TOMLDecodeError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    write_json(Path(args.out), table)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
