"""Weight-sync cost against parameter count: a publication into the weight channel (``rl/inference/weight_sync.py``) and
the rollout side's load from it, beside the per-tensor clone it replaced.

    python tools/bench_weight_sync.py [--params 1e6 1e7 1e8] [--dtype float32] [--bucket-mb 256] [--repeats 5]
        [--device cpu] [--json runs/bench_weight_sync.json]

The state is a GPT's: layers of hidden h with qkv (3h x h), proj (h x h), fc1 (4h x h), fc2 (h x 4h) and two norms,
enough layers for the parameter count. Per size, the median of ``--repeats`` timed runs (after one untimed run,
which allocates the slots) of:

* ``clone``: ``{k: v.clone()}``, what the trainer did before the channel;
* ``publish``: the trainer's copy into a free slot of bucketed buffers, and the commit;
* ``load``: the rollout engine's copy from the held slot into its own parameters;
* ``pickle``: a packed slot serialised as a Ray actor receives it (buckets and layout), and back.

Each row also gives the bytes moved per second of ``publish``; on one host the sync is memory copies, so that rate,
not the number of tensors, is what decides the time.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rl.inference.weight_sync import WeightChannel  # noqa: E402


def gpt_state(params: float, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """A GPT-shaped state dict of about ``params`` parameters: hidden 64 x 2^k, layers to fill the rest."""
    hidden = 64 * 2 ** max(0, round(math.log2(math.sqrt(params / 12 / 8) / 64)))
    layers = max(1, round(params / (12 * hidden * hidden)))
    state = {}
    for i in range(layers):
        p = f"decoder.layers.{i}."
        shapes = {"self_attention.linear_qkv.weight": (3 * hidden, hidden), "self_attention.linear_proj.weight":
                  (hidden, hidden), "mlp.linear_fc1.weight": (4 * hidden, hidden), "mlp.linear_fc2.weight":
                  (hidden, 4 * hidden), "input_layernorm.weight": (hidden,), "pre_mlp_layernorm.weight": (hidden,)}
        for name, shape in shapes.items():
            state[p + name] = torch.randn(shape, dtype=torch.float32, device=device).to(dtype)
    return state


def timed(fn, repeats: int) -> float:
    fn()   # untimed: allocation, first touch
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(params: float, dtype: torch.dtype, bucket_mb: float, repeats: int, device: str) -> dict:
    state = gpt_state(params, dtype, device)
    consumer = {k: torch.empty_like(v) for k, v in state.items()}
    channel = WeightChannel(bucket_mb, device)
    version = iter(range(10**6))

    def load():
        with channel.acquire() as slot:
            for k, v in slot.state.items():
                consumer[k].copy_(v)

    def roundtrip():
        with channel.acquire() as slot:
            pickle.loads(pickle.dumps(slot.state, protocol=5))

    n = sum(v.numel() for v in state.values())
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    row = {"params": n, "bytes": nbytes, "tensors": len(state), "dtype": str(dtype).removeprefix("torch."),
           "clone_s": timed(lambda: {k: v.clone() for k, v in state.items()}, repeats),
           "publish_s": timed(lambda: channel.publish(state, next(version)), repeats),
           "load_s": timed(load, repeats),
           "pickle_s": timed(roundtrip, repeats)}
    with channel.acquire() as slot:
        row["buckets"] = len(slot.state.buffers)
        assert all(torch.equal(slot.state[k], v) for k, v in state.items())
    row["publish_gb_per_s"] = nbytes / row["publish_s"] / 1e9
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--bucket-mb", type=float, default=256.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=Path("runs/bench_weight_sync.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    rows = [measure(n, getattr(torch, args.dtype), args.bucket_mb, args.repeats, args.device) for n in args.params]
    print(f"{'params':>12} {'tensors':>8} {'buckets':>8} {'clone':>10} {'publish':>10} {'load':>10} {'pickle':>10} "
          f"{'publish GB/s':>13}")
    for r in rows:
        print(f"{r['params']:>12,} {r['tensors']:>8} {r['buckets']:>8} {r['clone_s'] * 1e3:>8.2f}ms "
              f"{r['publish_s'] * 1e3:>8.2f}ms {r['load_s'] * 1e3:>8.2f}ms {r['pickle_s'] * 1e3:>8.2f}ms "
              f"{r['publish_gb_per_s']:>13.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": args.device, "bucket_mb": args.bucket_mb, "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
