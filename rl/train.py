"""Asynchronous RL with the precision runtime inside.

    python -m rl.train --config configs/rl_tiny_cpu.toml [--set dotted.key=value ...]

A short supervised warm start teaches the answer format (not the answers); then GRPO with IcePop trains the
policy on the reverse-digits task while a rollout worker generates with an FP8, possibly stale copy. Writes
the run directory of contract C3 (config.json, metrics.jsonl, precision_events.jsonl, summary.json,
checkpoints/).
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from precisionrt.config import Checked, ConfigError, Every, LearningRate, Range, Steps, to_dict
from precisionrt.distributed.parallel import resolve_device
from precisionrt.models.gpt import ModelConfig
from precisionrt.run import command
from precisionrt.run.checkpoint import save_checkpoint
from precisionrt.run.progress import Progress
from precisionrt.run.command import CommandConfig, TrainSchedule, check_common, report_skip, report_switches, run_cli
from precisionrt.run.harness import check_skipped, open_run
from precisionrt.run.resources import training_memory
from precisionrt.run.rundir import RunConfig
from rl.envs import TaskConfig
from rl.envs.calculator import EnvConfig
from rl.inference.executors import make_engine
from rl.algo.mismatch import FIELD_NAMES
from rl.inference.placement import actor_gpus, check_placement, rollout_device
from rl.inference.rollout import RolloutConfig
from rl.trainer import RLAlgoConfig, RLTrainer
from rl.warm_start import supervised_warm_start
from rl.workload import make_workload


@dataclass
class RLTrainConfig(TrainSchedule):
    steps: Steps = 400
    lr: LearningRate = 1e-3
    eval_every: Steps = 50
    warm_start_steps: Every = 25
    warm_start_batch: Annotated[int, Range(ge=1, le=2**20)] = 64
    warm_start_lr: LearningRate = 3e-3


@dataclass
class ExecutorConfig(Checked):
    kind: Literal["local", "ray"] = "local"
    mode: Literal["async", "sync"] = "async"
    num_workers: Annotated[int, Range(ge=1, le=256)] = 1
    """Rollout engines (Ray actors under ``kind = "ray"``); each pulls the newest weights by version when it is
    behind, just before it generates (``rl/inference/pool.py``)."""
    num_gpus: Annotated[float, Range(ge=-1, le=64)] = -1
    """GPUs each Ray rollout actor asks for (its engine runs on CUDA when it has one). -1: 1 when the trainer is
    on a GPU and ``rollout.placement = "split"``, else 0."""



def _default_model() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=16)


@dataclass
class RLConfig(CommandConfig):
    run: RunConfig = field(default_factory=lambda: RunConfig(name="rl"))
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    model: ModelConfig = field(default_factory=_default_model)
    rl: RLAlgoConfig = field(default_factory=RLAlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    """Multi-turn tasks (``task.name = "calculator"``): the tool and the turns."""


def idle_ratios(trainer: RLTrainer, elapsed: float) -> dict[str, float]:
    """Shares of ``elapsed`` that the trainer waited for samples, that the rollout engine was not generating
    and (multi-turn tasks) that no tool call was in flight; the engine's completion tokens per second of its
    busy time."""
    c = trainer.counters
    out = {"rl/trainer_idle_ratio": c.trainer_wait / elapsed, "rl/rollout_idle_ratio": 1 - c.rollout_busy / elapsed,
           "rl/rollout_tokens_per_s": c.generated_tokens / max(c.rollout_busy, 1e-9)}
    if hasattr(trainer.worker, "clock"):
        out["rl/env_idle_ratio"] = 1 - trainer.worker.clock.busy / elapsed
    return out


def check_config(cfg: RLConfig) -> None:
    """The rules that join several tables, or need the machine (memory), checked before anything is built or
    written; each error names the keys involved."""
    if cfg.rl.mismatch_policy.scope == "both" and cfg.rl.mismatch_policy.promote_share > 0 \
            and cfg.precision.mode != "dynamic":
        raise ConfigError(f'rl.mismatch_policy.scope: "both" promotes the trainer\'s layer through the precision '
                          f'policy, which needs precision.mode = "dynamic" (got {cfg.precision.mode!r})')
    check_placement(cfg, resolve_device(cfg.run.device))
    batch = cfg.rl.prompts_per_step * cfg.rl.group_size
    check_common(cfg, 1, training_memory(cfg.model.dims(), max(batch, cfg.train.warm_start_batch)), "a trainer step",
                 "rl.prompts_per_step x rl.group_size (or train.warm_start_batch), model.*")


def mismatch_around(k3_by_step: dict[int, float], step: int | None, window: int = 10) -> dict | None:
    """The mean k3 KL between trainer and rollout over the ``window`` RL steps before ``step`` (a switch's) and
    the ``window`` from it on: what the switch did to the mismatch. None without a switch."""
    if step is None:
        return None
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    return {"rl_step": step, "window": window,
            "before": mean([v for s, v in k3_by_step.items() if step - window <= s < step]),
            "after": mean([v for s, v in k3_by_step.items() if step <= s < step + window])}


def make_optimizer(model, lr: float, **kw) -> torch.optim.AdamW:
    """AdamW, fused: it skips a step with nonfinite gradients on the device (``found_inf``), so an ordinary RL
    step reads nothing back but its one transfer of metrics (``RLTrainer.train_step``)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=True, **kw)


def train(cfg: RLConfig) -> dict:
    check_config(cfg)
    started = command.start(cfg)
    device, model, runtime, injector = started.device, started.model, started.runtime, started.injector
    work = make_workload(cfg)
    end = cfg.train.end
    opened = open_run(cfg, model, runtime.names, end)
    if opened.finished is not None:
        return opened.finished
    run_dir, logger, found = opened.run_dir, opened.logger, opened.checkpoint
    t_start = time.time()

    optimizer = make_optimizer(model, cfg.train.lr, betas=(0.9, 0.95), weight_decay=0.0)
    offset = cfg.train.warm_start_steps  # optimizer steps before RL: the switch log counts all of them
    start, masked, earlier_switches = 0, [], []   # switches before a resumed run's checkpoint
    with opened.starting():
        weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        engine = make_engine(cfg.executor.kind, cfg.model, cfg.rollout, cfg.executor.num_workers,
                             rollout_device(cfg, device), actor_gpus(cfg, device),
                             object_store_mib=max(256, int(4 * weights_mib)))   # a few publications in flight
        if found is None:
            runtime.start_log(run_dir, to_dict(cfg))
            warm_opt = make_optimizer(model, cfg.train.warm_start_lr)
            warm = supervised_warm_start(model, warm_opt, work.warm_batches, cfg.train.warm_start_steps,
                                         cfg.train.seed, runtime, before_step=injector.before_step,
                                         report_every=max(1, cfg.train.warm_start_steps // 6))
            warm_loss, earlier_switches = warm.loss, [e.summary() for e in warm.switches]
        else:
            start, state = found
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            runtime.load_state_dict(state["runtime"])
            # the runtime counts optimizer steps (rl.ppo_minibatches x rl.ppo_epochs per RL step)
            runtime.start_log(run_dir, to_dict(cfg), resumed_from=runtime.last_step)
            masked, warm_loss = state["rl"]["masked"], math.nan
            earlier_switches = state["rl"].get("switches", [])
    trainer = RLTrainer(model, runtime, optimizer, engine, work.task, cfg.rl, cfg.executor.mode, cfg.train.seed + 1,
                        work.max_new_tokens, cfg.rollout, work.worker, **work.worker_args)
    if found is None:
        trainer.skipped_steps = list(warm.skipped_steps)   # numbered 1..warm_start_steps, before the RL steps
        reward_initial, eval_initial = work.evaluate(trainer)
        print(f"warm start: {cfg.train.warm_start_steps} steps, loss {warm_loss:.3f}; held-out reward "
              f"{reward_initial:.3f}", flush=True)
        logger.log(0, {"eval/reward": reward_initial, "warm_start/loss": warm_loss,
                       **{f"eval/{k}": v for k, v in eval_initial.items()}})
    else:
        trainer.load_state_dict(state["rl"]["trainer"])
        reward_initial, eval_initial = state["rl"]["reward_initial"], state["rl"].get("eval_initial", {})

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir, step, {
            "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "runtime": runtime.state_dict(),
            "rl": {"trainer": trainer.state_dict(), "reward_initial": reward_initial, "eval_initial": eval_initial,
                   "masked": masked,
                   "switches": earlier_switches + [e.summary() for e in switches]}},
            keep=cfg.train.keep_checkpoints, config=to_dict(cfg))

    switches, reward_final, eval_final, agent_totals, trainer_rates = [], reward_initial, eval_initial, Counter(), []
    trained_before = trainer.ctrl.acct.trained
    mismatch, first_switch = {}, None   # k3 KL per RL step; the RL step of this segment's first switch
    print(f"rollout precision: {cfg.rollout.precision}"
          + (" (follows each layer's forward GEMM as the trainer switches it)" if cfg.rollout.precision == "follow"
             else " (fixed: the rollout does not follow the trainer's switches; rollout.precision = \"follow\" "
                  "would)"), flush=True)
    progress = Progress("RL", start + 1, end, "columns: step, sampled reward (mean of the step's rollouts, 0-1), "
                        "held-out reward (greedy, the last evaluation), staleness (policy versions, mean), IcePop "
                        "masked (share of tokens), k3 KL (trainer vs rollout), fp8 (share of GEMM FLOPs)")
    trainer.start()
    t_rl = time.time()
    try:
        for step in range(start + 1, end + 1):
            injector.before_step(offset + step - 1)
            m = trainer.train_step(offset + step, cfg.train.grad_clip)
            switches += m["events"]
            trainer_rates.append(m["trainer_tokens_per_s"])
            if m["skipped"]:
                report_skip(step, " (its samples dropped)")
            check_skipped(sum(s > offset + start for s in trainer.skipped_steps), step - start,
                          cfg.train.max_skipped_fraction)
            report_switches(logger, step, m["events"])
            masked.append(m["masked_fraction"])
            mismatch[step] = m["rollout_corr/k3_kl"]
            if m["events"] and first_switch is None:
                first_switch = step
            # the field's own metric names (rollout_corr/..., tis_clipfrac, ...) as they are; ours under rl/
            row = {k if "/" in k or k in FIELD_NAMES else f"rl/{k}": v for k, v in m.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
            elapsed = time.time() - t_rl
            row.update({"rl/staleness_histogram": m["staleness"], "rl/k3_kl_by_map_version": m["k3_kl_by_map_version"],
                        **idle_ratios(trainer, elapsed)})
            evaluating = step % cfg.train.eval_every == 0 or step == end
            if evaluating:
                reward_final, eval_final = work.evaluate(trainer)
                row.update({"eval/reward": reward_final, **{f"eval/{k}": v for k, v in eval_final.items()}})
            if step % cfg.train.log_every == 0 or evaluating:   # an evaluation is always logged
                row.update(runtime.metrics())   # FLOP shares: a read from the device, at log steps only
                acct = trainer.ctrl.acct
                row.update({"samples/generated": acct.generated, "samples/trained": acct.trained,
                            "samples/dropped": sum(acct.dropped.values()), "samples/in_flight": acct.in_flight})
                if work.multi_turn:   # the episodes finished since the last logged step
                    episodes = trainer.worker.take_stats()
                    agent_totals.update({k: v for k, v in episodes.items() if not k.startswith("tool_")})
                    row.update({f"agent/{k}": v for k, v in episodes.items()})
                logger.log(step, row)
                progress.line(step, f"step {step:>4}/{cfg.train.steps}  reward {m['reward']:.3f}  held-out "
                              f"{reward_final:.3f}  staleness {m['staleness_mean']:.1f}  icepop masked "
                              f"{m['masked_fraction']:.1%}  k3 kl {m['rollout_corr/k3_kl']:.2e}  "
                              f"fp8 {row['precision/fp8_flop_fraction']:.0%}")
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step != end:
                checkpoint(step)
    finally:
        trainer.stop()
        engine.close()
    rl_wall = time.time() - t_rl
    trainer.ctrl.check(trainer.present_samples())
    checkpoint(end)
    acct = trainer.ctrl.acct
    c = trainer.counters
    summary = {
        "steps": end, "resumed_from": start, "wall_s": time.time() - t_start, "rl_wall_s": rl_wall,
        "parameters": sum(p.numel() for p in model.parameters()),
        "reward_initial": reward_initial, "reward_final": reward_final, "samples": acct.as_dict(),
        "skipped_steps": trainer.skipped_steps, "control_rejected": runtime.control_rejected,
        "max_staleness_trained": max(acct.staleness_trained, default=0),
        "staleness_histogram": {str(k): v for k, v in sorted(acct.staleness_trained.items())},
        "icepop_masked_fraction": sum(masked) / len(masked) if masked else math.nan,
        "samples_per_s": (acct.trained - trained_before) / rl_wall,
        **{k.removeprefix("rl/"): v for k, v in idle_ratios(trainer, rl_wall).items()},
        "trainer_tokens_per_s": sum(trainer_rates) / max(len(trainer_rates), 1),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "rollout_errors": c.errors[:10], "fp8_flop_fraction": runtime.fp8_flop_fraction(),
        "switches": earlier_switches + [e.summary() for e in switches], "executor": to_dict(cfg.executor),
        "rollout_precision": cfg.rollout.precision, "correction": cfg.rl.loss.correction,
        # the trainer's precision map: each change (map version, step, layers) and when the rollout engine took
        # it (map version, with the weights of that policy version; resumed runs list this segment's)
        "rollout_precision_changes": trainer.precision_changes,
        "rollout_maps_applied": [list(x) for x in trainer.worker.maps_applied],
        "trained_by_map_version": {str(k): v for k, v in sorted(trainer.trained_by_map.items())},
        "mismatch_share": dict(sorted(trainer.attribution.shares.items())),
        "rollout_promotions": dict(sorted(trainer.rollout_bf16.items())),
        "k3_kl_by_map_version": {str(k): s / max(n, 1) for k, (s, n) in sorted(trainer.mismatch_by_map.items())},
        "mismatch_around_first_switch": mismatch_around(mismatch, first_switch),
    }
    if work.multi_turn:   # this segment's episodes (a resumed run: since the resume)
        agent_totals.update({k: v for k, v in trainer.worker.take_stats().items() if not k.startswith("tool_")})
        summary["heldout_initial"], summary["heldout_final"] = eval_initial, eval_final
        summary["agent"] = {**dict(agent_totals), **{f"tool_{k}": v for k, v in work.task.stats.items()}}
    return command.finish(cfg, started, logger, run_dir, summary, offset + end,
                          f"done: held-out reward {reward_initial:.3f} -> {reward_final:.3f}, "
                          f"{summary['samples_per_s']:.1f} samples/s, samples {acct.as_dict()}")


def main(argv: list[str] | None = None) -> int:
    return run_cli("python -m rl.train", __doc__.split("\n\n")[0], RLConfig, train, argv)


if __name__ == "__main__":
    sys.exit(main())
