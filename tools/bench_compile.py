"""Compiled against eager training steps: how far apart they are (loss, gradients, scales) and how fast each is.

    python tools/bench_compile.py [--device cpu] [--backend inductor] [--regions block] [--modes fp8 dynamic]
        [--steps 6] [--hidden 64] [--layers 2] [--json runs/bench_compile.json]

Per mode, two models from one seed train on the same batches, one eager and one compiled
(``precisionrt.compile_model``). The loss's relative difference, the largest gradient difference over the largest
gradient of its tensor, the largest relative scale difference: at the first step (the same weights: what
compilation alone changes) and the largest over the run (after optimizer steps, which compound them). Times: the first compiled step
(compilation), then the median of the others for both. Under ``--backend aot_eager`` the differences are 0
(``tests/test_compile.py`` holds that); under inductor they are what reordering norms, softmax and GEMM
epilogues gives.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from precisionrt.distributed.compile import compile_model  # noqa: E402
from precisionrt.layers.linear import precision_layers  # noqa: E402
from precisionrt.models.gpt import ModelConfig, build_gpt  # noqa: E402
from precisionrt.distributed.parallel import init_parallel
from precisionrt.runtime.precision_runtime import PrecisionRuntime, RuntimeConfig  # noqa: E402


def train(cfg: ModelConfig, mode: str, batches, device, compile_args: dict | None) -> list[dict]:
    torch.manual_seed(0)
    model = build_gpt(cfg, device=device)
    runtime = PrecisionRuntime(model, RuntimeConfig(mode=mode))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = compile_model(model, **compile_args) if compile_args else model
    out = []
    for step, tokens in enumerate(batches, start=1):
        t0 = time.perf_counter()
        inputs = tokens[:, :-1]
        positions = torch.arange(inputs.shape[1], device=device).unsqueeze(0).expand_as(inputs)
        loss = run(inputs, positions, None, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        runtime.end_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        scales = torch.stack([s.scale.clone() for l in precision_layers(model).values()
                              for s in l.numerics.scaling.values()])
        out.append({"loss": loss.detach(), "grads": grads, "scales": scales, "time": time.perf_counter() - t0})
    return out


def compare(eager: list[dict], compiled: list[dict]) -> dict:
    """Differences at the first step (the same weights: what compilation alone changes) and the largest over the
    run (after optimizer steps, where a rounding difference compounds), and the step times."""
    def rel(a, b):
        return ((a - b).abs().max() / a.abs().max().clamp(min=1e-30)).item()

    def diffs(e: dict, c: dict) -> dict:
        return {"loss_rel": abs(e["loss"] - c["loss"]).item() / abs(e["loss"]).item(),
                "grad_rel": max(rel(a, b) for a, b in zip(e["grads"], c["grads"])),
                "scale_rel": ((e["scales"] - c["scales"]).abs() / e["scales"]).max().item()}
    steps = [diffs(e, c) for e, c in zip(eager, compiled)]
    return {"first_step": steps[0], "run_max": {k: max(s[k] for s in steps) for k in steps[0]},
            "compile_step_s": compiled[0]["time"],
            "eager_step_s": statistics.median(e["time"] for e in eager[1:]),
            "compiled_step_s": statistics.median(c["time"] for c in compiled[1:])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--regions", default="block", choices=["block", "model"])
    p.add_argument("--modes", nargs="+", default=["fp8", "dynamic"], choices=["fp8", "bf16", "dynamic"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("runs/bench_compile.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    init_parallel(1, device=device)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
                      ffn_hidden_size=2 * args.hidden, seq_length=32, vocab_size=256)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (4, 33), generator=g).to(device) for _ in range(args.steps)]
    rows = {}
    for mode in args.modes:
        eager = train(cfg, mode, batches, device, None)
        compiled = train(cfg, mode, batches, device, {"regions": args.regions, "backend": args.backend})
        rows[mode] = compare(eager, compiled)
    print(f"{'mode':<8} {'':<10} {'loss rel':>9} {'grad rel':>9} {'scale rel':>9}")
    for mode, r in rows.items():
        for window in ("first_step", "run_max"):
            d = r[window]
            print(f"{mode:<8} {window:<10} {d['loss_rel']:>9.1e} {d['grad_rel']:>9.1e} {d['scale_rel']:>9.1e}")
        print(f"{mode:<8} compile {r['compile_step_s']:.1f} s; step eager {r['eager_step_s'] * 1e3:.1f} ms, "
              f"compiled {r['compiled_step_s'] * 1e3:.1f} ms")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
