"""What the RL command trains on: a single-turn task, or a multi-turn environment with tools.

``make_workload`` turns the ``[task]`` (and, for ``task.name = "calculator"``, ``[env]``) tables into what the
trainer needs: the problems, the decode budget, the warm-start batches, the rollout worker and how to
measure the held-out reward. The trainer and the command stay the same for both kinds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from precisionrt.config import ConfigError
from precisionrt.models.tokenizer import load_tokenizer
from rl.workers import agent
from rl.workers.agent_worker import AgentRolloutWorker
from rl.envs import chat, make_task
from rl.envs.calculator import CalculatorEnv
from rl.inference.rollout import generate
from rl.warm_start import task_batch
from rl.workers.worker import RolloutWorker


@dataclass
class Workload:
    task: object
    """A ``rl.envs.Task`` or a ``rl.envs.agent.MultiTurnEnv``."""
    max_new_tokens: int
    """Decode budget: of a completion, or of one action."""
    warm_batches: Callable
    """``rng -> (tokens, mask)`` for the supervised warm start."""
    evaluate: Callable
    """``trainer -> (held-out reward, {other held-out figures})`` of the trainer's policy, greedy."""
    worker: type = RolloutWorker
    worker_args: dict = field(default_factory=dict)

    @property
    def multi_turn(self) -> bool:
        return self.worker is AgentRolloutWorker


def make_workload(cfg) -> Workload:
    """From an ``rl.train.RLConfig``; a context too short for the task is a ``ConfigError``."""
    seq = cfg.model.seq_length
    if cfg.task.name != "calculator":
        task = chat.wrap(make_task(cfg.task), load_tokenizer(cfg.model))
        heldout = task.heldout()
        if task.max_prompt_tokens + task.max_completion_tokens > seq:
            raise ConfigError(f"model.seq_length {seq} is shorter than the longest prompt ({task.max_prompt_tokens}) "
                              f"plus the answer budget ({task.max_completion_tokens})")
        return Workload(task, task.max_completion_tokens, task_batch(task, cfg.train.warm_start_batch),
                        lambda trainer: (trainer.evaluate(heldout), {}))
    env = CalculatorEnv(cfg.task, cfg.env, tool_seed=cfg.train.seed)
    turns = chat.turns(load_tokenizer(cfg.model))
    budget = cfg.env.max_action_tokens
    # the longest warm-start transcript: the prompt, a failed call and its error, the call, its result, the
    # answer (in chat, each of those six turns with what the template puts around it)
    need = 3 * env.max_prompt_tokens + len(b"E:service unavailable\n") + 2 * (cfg.task.max_digits + 3) \
        + 6 * turns.overhead
    if need > seq or env.max_prompt_tokens + turns.overhead + budget > seq:
        raise ConfigError(f"model.seq_length {seq} is too short for a calculator episode: a recovered one of "
                          f"{cfg.task.max_digits}-digit operands takes {need} tokens")
    # held-out reward measures the policy, not the service's luck: the same delays, no failures or hangs
    reliable = dataclasses.replace(cfg.env, tool=dataclasses.replace(cfg.env.tool, failure_rate=0.0, hang_rate=0.0))
    held_env = CalculatorEnv(cfg.task, reliable)
    heldout = held_env.heldout()

    def evaluate(trainer) -> tuple[float, dict]:
        def decode(prompts: list[list[int]], keys: list[str]):
            return generate(trainer.model, prompts, budget, seq, 0.0, 1.0, torch.Generator(),
                            stop_ids=turns.stop_ids)
        return agent.evaluate(held_env, heldout, decode, budget, seq, turns)

    return Workload(env, budget, agent.warm_start_batches(env, cfg.train.warm_start_batch, cfg.rl.error_masking,
                                                          cfg.train.seed, turns),
                    evaluate, AgentRolloutWorker, {"max_len": seq, "turns": turns})
