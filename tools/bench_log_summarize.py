"""`precisionrt-log summarize` on a generated 1,000,000-record switch log: wall time and peak memory.

    python tools/bench_log_summarize.py [--records 1000000] [--layers 4] [--out runs/bench_log]

The log has our writer's shape: a run_start with the layer table, then per step one stats record for
``--layers`` layers with every signal, a switch record every 1000 steps, and run_end. The summarize runs in a
child process (`python -m precisionrt.observe.cli summarize --json`), so its peak RSS is measured alone.
Targets (issue 5): under 10 s and under 500 MB.
"""

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

SIGNALS = ("overflow", "headroom", "amax_jump", "underflow", "nonfinite", "quant_error", "grad_rel_err",
           "grad_cos", "grad_norm_z")


def generate(path: Path, records: int, n_layers: int) -> None:
    rng = random.Random(0)
    names = [f"decoder.layers.{i // 4}.{['self_attention.linear_qkv', 'self_attention.linear_proj', 'mlp.linear_fc1', 'mlp.linear_fc2'][i % 4]}"
             for i in range(n_layers)]
    precision = {n: "fp8" for n in names}
    dump = lambda r: json.dumps(r, separators=(",", ":"))  # noqa: E731
    with open(path, "w") as fh:
        fh.write(dump({"v": 1, "kind": "run_start", "run": "bench", "time": 0.0, "config": {},
                       "layers": [{"name": n, "index": i, "gemm_flops_per_token": 6 * 128 * 512}
                                  for i, n in enumerate(names)]}) + "\n")
        written, step = 1, 0
        while written < records - 1:
            step += 1
            if step % 1000 == 0:
                n = rng.choice(names)
                to = "bf16" if precision[n] == "fp8" else "fp8"
                fh.write(dump({"v": 1, "kind": "switch", "run": "bench", "time": 0.0, "step": step, "layer": n,
                               "from": precision[n], "to": to, "reason": "underflow" if to == "bf16" else "probation",
                               "signals": {s: rng.random() for s in SIGNALS}}) + "\n")
                precision[n] = to
                written += 1
            fh.write(dump({"v": 1, "kind": "stats", "run": "bench", "time": 0.0, "step": step, "layers": {
                n: {"precision": precision[n], "state": precision[n], **{s: rng.random() for s in SIGNALS}}
                for n in names}}) + "\n")
            written += 1
        fh.write(dump({"v": 1, "kind": "run_end", "run": "bench", "time": 0.0, "step": step}) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("runs/bench_log"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "precision_events.jsonl"
    t0 = time.perf_counter()
    generate(log, args.records, args.layers)
    print(f"generated {args.records:,} records, {log.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "precisionrt.observe.cli", "summarize", str(log), "--json"],
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB on Linux
    summary = json.loads(proc.stdout)
    result = {"records": args.records, "layers": args.layers, "file_mib": log.stat().st_size / 2**20,
              "wall_s": wall, "peak_rss_mib": peak, "steps": summary["runs"][0]["steps"],
              "switches": summary["runs"][0]["switches"], "skipped_lines": summary["skipped_lines"]}
    (args.out / "bench_log_summarize.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"summarize: {wall:.2f} s wall, peak RSS {peak:.0f} MiB (targets: < 10 s, < 500 MB); "
          f"{result['switches']} switches over {result['steps']:,} steps, {result['skipped_lines']} skipped")
    log.unlink()  # the generated log is large; the JSON result stays
    return 0


if __name__ == "__main__":
    sys.exit(main())
