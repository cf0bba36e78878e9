"""How far does supervised training alone take a task? The learning curve of the RL command's warm start.

    python tools/warm_start_curve.py [--config configs/rl_addition_cpu.toml] [--steps 1500] [--every 100]
                                     [--seeds 0 1 2] [--json runs/warm_start_curve.json] [--set key=value ...]

For each seed, builds the model as ``python -m rl.train`` does and runs its warm start (same batches, rate,
precision runtime: ``rl.warm_start.supervised_warm_start``), measuring the greedy held-out reward every
``--every`` steps as the RL command does (evaluation passes record no statistics and move no amax history, so
the measurements change nothing: the reward at step N is what ``rl.train`` reports after a warm start of N
steps). Prints the curve, one column per seed, and
writes JSON. Single-turn tasks only. ``--set`` takes the RL command's keys (e.g. ``train.warm_start_lr=3e-3``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from precisionrt.config import ConfigError, load_config  # noqa: E402
from precisionrt.models.gpt import build_gpt  # noqa: E402
from precisionrt.distributed.parallel import init_parallel
from precisionrt.runtime.precision_runtime import PrecisionRuntime  # noqa: E402
from precisionrt.models.tokenizer import load_tokenizer  # noqa: E402
from rl.envs import chat, make_task  # noqa: E402
from rl.train import RLConfig  # noqa: E402
from rl.trainer import greedy_reward  # noqa: E402
from rl.warm_start import supervised_warm_start, task_batch  # noqa: E402


def curve(cfg: RLConfig, steps: int, every: int) -> list[dict]:
    """``[{step, reward, wall_s}]`` of the warm start of ``cfg`` (its seed), every ``every`` steps."""
    init_parallel(1, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build_gpt(cfg.model)
    runtime = PrecisionRuntime(model, cfg.precision)
    task = chat.wrap(make_task(cfg.task), load_tokenizer(cfg.model))   # as rl.workload does
    heldout = task.heldout()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.warm_start_lr)
    points, t0 = [], time.perf_counter()

    def measure(step: int) -> None:
        if step % every and step != steps:
            return
        reward = greedy_reward(model, task, heldout, task.max_completion_tokens, cfg.model.seq_length)
        points.append({"step": step, "reward": reward, "wall_s": time.perf_counter() - t0})
        print(f"  seed {cfg.train.seed} step {step:>5}: held-out reward {reward:.3f}", flush=True)

    supervised_warm_start(model, optimizer, task_batch(task, cfg.train.warm_start_batch), steps, cfg.train.seed,
                          runtime, after_step=measure)
    return points


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/rl_addition_cpu.toml")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--json", type=Path, default=Path("runs/warm_start_curve.json"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    if args.steps < 1 or args.every < 1:
        p.error("--steps and --every must be >= 1")
    curves = {}
    for seed in args.seeds:
        cfg = load_config(RLConfig, args.config, [*args.overrides, f"train.seed={seed}"])
        if cfg.task.name == "calculator":
            raise ConfigError("task.name: the warm-start curve measures single-turn tasks; 'calculator' is multi-turn")
        curves[seed] = curve(cfg, args.steps, args.every)
    steps = [pt["step"] for pt in curves[args.seeds[0]]]
    print("\n| warm-start steps | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|" + "---|" * len(args.seeds))
    for i, step in enumerate(steps):
        print(f"| {step} | " + " | ".join(f"{curves[s][i]['reward']:.3f}" for s in args.seeds) + " |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                     "curves": {str(s): c for s, c in curves.items()}}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
