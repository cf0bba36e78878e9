"""The RL loop on one GPU, checked in one command (issue 24, item 5): under 8 minutes on one H100/H200.

    python tools/gpu_check.py [--device cuda] [--quick] [--out runs/gpu_check] [--scratch runs/gpu_check_runs]
        [--budget 470]

Rehearse it anywhere with ``--device cpu --quick`` (same stages, small sizes): then only the device is new when a
GPU comes. Each stage runs in a process of its own with what is left of ``--budget`` seconds (a stage that runs
out is reported as such; the others still run); its run directories, result and log stay in ``--scratch``. The
whole is printed as a table and written to one file, ``<out>/gpu_check.json`` (a failed stage brings its log's
tail).

1. ``tests``: ``pytest tests/test_cuda.py`` (fused kernels bit for bit, host-sync budgets of the LM and RL steps).
2. ``syncs``: host synchronisations (``set_sync_debug_mode``; on the CPU, ``precisionrt.distributed.syncs.HostReads``) of
   ordinary and check RL trainer steps and of a 64-step decode at ``rollout.sync_every`` 16.
3. ``qwen05b``: a few RL steps of ``configs/rl_qwen05b_gpu.toml`` (Qwen2.5-0.5B's architecture, random weights):
   rollout and trainer tokens per second, peak GPU memory.
4. ``main_job``: the main job (``configs/rl_addition_cpu.toml``) on the device: held-out reward and samples/s
   against the CPU run recorded in ``docs/bench/main_job_cpu.json``.

docs/results.md, "The RL loop on a GPU" (#the-rl-loop-on-a-gpu), says what each number should be.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ("tests", "syncs", "qwen05b", "main_job")
QUICK_MODEL = ["model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4",
               "model.num_query_groups=2", "model.ffn_hidden_size=256", "model.vocab_size=512"]


def rl_run(config: str, out: Path, device: str, overrides: list[str]) -> dict:
    """``rl.train`` in this process; its summary."""
    from precisionrt.config import load_config
    from rl.train import RLConfig, train

    return train(load_config(RLConfig, ROOT / config, [f'run.device="{device}"', f'run.dir="{out}"',
                                                       "wandb.enabled=false", *overrides]))


def counter(device: str):
    """``fn -> list of sync sites``: CUDA's sync debug mode on a GPU, host reads elsewhere."""
    if device == "cuda":
        from precisionrt.distributed.syncs import host_syncs
        host_syncs(lambda: None)   # the first switch into "warn" mode reports itself once
        return host_syncs
    from precisionrt.distributed.syncs import HostReads

    def reads(fn):
        with HostReads() as r:
            fn()
        return [site for _, site in r.sites]
    return reads


def stage_tests(args) -> dict:
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                       cwd=ROOT, capture_output=True, text=True)
    last = (p.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in (w.split() for w in last.split(" in ")[0].split(", ") if w[:1].isdigit())}
    return {"returncode": p.returncode, "summary": last, "wall_s": time.time() - t0, **counts,
            "failures": [l for l in p.stdout.splitlines() if l.startswith("FAILED")][:10]}


def stage_syncs(args) -> dict:
    import torch

    from precisionrt.models.gpt import ModelConfig, build_gpt
    from rl.inference.rollout import generate
    from rl.trainer import RLTrainer

    count = counter(args.device)
    steps, original = [], RLTrainer.train_step

    def measured(self, step, grad_clip):
        self.worker.rollout_once()   # the batch, outside the measured region
        out = []
        steps.append((self.runtime.last_step + 1, count(lambda: out.append(original(self, step, grad_clip)))))
        return out[0]

    RLTrainer.train_step = measured
    rl_run("configs/rl_tiny_cpu.toml", args.scratch / "syncs_run", args.device, [
        'executor.mode="sync"', "train.steps=12", "train.warm_start_steps=4", "train.eval_every=12",
        "train.log_every=12", "precision.monitor.check_interval=4"])
    RLTrainer.train_step = original
    ordinary = [len(s) for n, s in steps[2:] if n % 4]
    check = [len(s) for n, s in steps[2:] if n % 4 == 0]
    torch.manual_seed(0)
    model = build_gpt(ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                  seq_length=80), device=args.device)
    gen = torch.Generator(args.device).manual_seed(0)

    def decode():
        generate(model, [b"12+34=", b"7+8="], 64, 80, 1.0, 1.0, gen, kv_cache=True, stop_ids=(-1,), sync_every=16)

    decode()
    return {"counted": "cuda sync debug mode" if args.device == "cuda" else "host reads (HostReads)",
            "ordinary_step": statistics.median(ordinary), "ordinary_step_max": max(ordinary),
            "check_step": statistics.median(check), "decode_64_steps": len(count(decode)),
            "sites_of_one_ordinary_step": next(s for n, s in steps[2:] if n % 4)}


def stage_qwen05b(args) -> dict:
    overrides = ["train.steps=4", "train.eval_every=4", "train.log_every=1"] + (QUICK_MODEL if args.quick else [])
    s = rl_run("configs/rl_qwen05b_gpu.toml", args.scratch / "qwen05b_run", args.device, overrides)
    return {k: s[k] for k in ("parameters", "rollout_tokens_per_s", "trainer_tokens_per_s", "peak_memory_gib",
                              "samples_per_s", "rl_wall_s", "wall_s", "fp8_flop_fraction")}


def stage_main_job(args) -> dict:
    overrides = ["train.steps=20", "train.warm_start_steps=100"] if args.quick else []
    s = rl_run("configs/rl_addition_cpu.toml", args.scratch / "main_job_run", args.device, overrides)
    cpu = json.loads((ROOT / "docs/bench/main_job_cpu.json").read_text())
    return {"reward_initial": s["reward_initial"], "reward_final": s["reward_final"],
            "samples_per_s": s["samples_per_s"], "wall_s": s["wall_s"], "rl_wall_s": s["rl_wall_s"],
            "cpu_reward_final": cpu["reward_final"], "cpu_samples_per_s": cpu["samples_per_s"],
            "samples_per_s_vs_cpu": s["samples_per_s"] / cpu["samples_per_s"], "complete": not args.quick}


def run_stage(args) -> int:
    t0 = time.time()
    result = {"stage": args.stage, "device": args.device, **globals()[f"stage_{args.stage}"](args)}
    result["stage_s"] = time.time() - t0
    (args.scratch / f"{args.stage}.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


def table(results: dict) -> str:
    rows = []
    t = results.get("tests", {})
    rows.append(("tests/test_cuda.py", t.get("summary", t.get("error", "")), "all pass"))
    s = results.get("syncs", {})
    if "ordinary_step" in s:
        rows += [("syncs: ordinary RL step", f"{s['ordinary_step']} (max {s['ordinary_step_max']})", "1"),
                 ("syncs: check RL step", s["check_step"], "2"),
                 ("syncs: 64-step decode, sync_every 16", s["decode_64_steps"], "4")]
    else:
        rows.append(("syncs", s.get("error", "missing"), ""))
    q = results.get("qwen05b", {})
    if "parameters" in q:
        mem = "n/a (cpu)" if q["peak_memory_gib"] is None else f"{q['peak_memory_gib']:.1f} GiB"
        rows += [("0.5B: parameters", f"{q['parameters']:,}", "~0.63B (untied head)"),
                 ("0.5B: rollout tokens/s", f"{q['rollout_tokens_per_s']:,.0f}", "see docs/results.md#the-rl-loop-on-a-gpu"),
                 ("0.5B: trainer tokens/s", f"{q['trainer_tokens_per_s']:,.0f}", "see docs/results.md#the-rl-loop-on-a-gpu"),
                 ("0.5B: peak memory", mem, "< 30 GiB")]
    else:
        rows.append(("qwen05b", q.get("error", "missing"), ""))
    m = results.get("main_job", {})
    if "reward_final" in m:
        rows += [("main job: held-out reward", f"{m['reward_initial']:.3f} -> {m['reward_final']:.3f}",
                  f"0.95+ (CPU: {m['cpu_reward_final']:.3f})"),
                 ("main job: samples/s", f"{m['samples_per_s']:,.0f} ({m['samples_per_s_vs_cpu']:.2f}x CPU)",
                  f"CPU: {m['cpu_samples_per_s']:,.0f}")]
    else:
        rows.append(("main_job", m.get("error", "missing"), ""))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {str(b):<40}  expected: {c}" for a, b, c in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="small sizes: a rehearsal of every stage")
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="where gpu_check.json goes")
    p.add_argument("--scratch", type=Path, default=Path("runs/gpu_check_runs"),
                   help="run directories (checkpoints: GBs at 0.5B), per-stage results and logs")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for all stages together")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)   # one stage, in this process
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.scratch.mkdir(parents=True, exist_ok=True)
    if args.stage:
        return run_stage(args)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("gpu_check: --device cuda, but torch sees no CUDA device; rehearse with --device cpu --quick")
            return 2
    deadline, results = time.time() + args.budget, {}
    for stage in args.stages:
        left = deadline - time.time()
        print(f"[gpu_check] {stage} ({left:.0f} s left)", flush=True)
        cmd = [sys.executable, __file__, "--stage", stage, "--device", args.device, "--out", str(args.out),
               "--scratch", str(args.scratch)]
        try:
            proc = subprocess.run(cmd + (["--quick"] if args.quick else []), cwd=ROOT, timeout=max(left, 1),
                                  capture_output=True, text=True)
            tail = (proc.stdout + proc.stderr)[-3000:]
            (args.scratch / f"{stage}.log").write_text(proc.stdout + proc.stderr)
            path = args.scratch / f"{stage}.json"
            results[stage] = json.loads(path.read_text()) if proc.returncode == 0 and path.exists() else \
                {"error": f"exit {proc.returncode}", "tail": tail}
        except subprocess.TimeoutExpired:
            results[stage] = {"error": f"out of time ({args.budget:.0f} s budget)"}
    text = table(results)
    print(text)
    (args.out / "gpu_check.json").write_text(json.dumps({"device": args.device, "quick": args.quick,
                                                         "results": results}, indent=1, default=str))
    print(f"wrote {args.out / 'gpu_check.json'}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
