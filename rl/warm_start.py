"""The supervised warm start before RL: a short run of next-token training on correct answers.

The standard SFT-then-RL recipe: the policy learns the answer format and part of the task from demonstrations,
then RL takes it the rest of the way. Its steps are optimizer steps like any other (fault injection, skipped
nonfinite steps and the precision runtime's switches all apply), and the switch log counts them.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Callable

import torch

from precisionrt.runtime.precision_runtime import PrecisionRuntime
from precisionrt.distributed.syncs import to_device
from precisionrt.run.progress import Progress
from rl.envs import Task
from rl.inference.decode import logits_of, model_device

log = logging.getLogger(__name__)


@dataclass
class WarmStart:
    loss: float
    skipped_steps: list[int]
    switches: list


def task_batch(task: Task, batch_size: int) -> Callable[[random.Random], tuple[torch.Tensor, torch.Tensor]]:
    """Warm-start batches of a single-turn task: prompt, the demonstrator's answer (``task.demonstration``: the
    correct one unless ``task.demonstrator_drops_carry`` says otherwise), stop token; the answer is trained."""
    def make(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        examples = []
        for _ in range(batch_size):
            p = task.sample(rng)
            examples.append(task.format_example(p, task.demonstration(p, rng)))
        width = max(len(p) + len(c) for p, c in examples)
        tokens = torch.zeros(batch_size, width, dtype=torch.long)
        mask = torch.zeros(batch_size, width - 1)
        for i, (p, c) in enumerate(examples):
            s = list(p) + list(c)
            tokens[i, :len(s)] = torch.tensor(s)
            mask[i, len(p) - 1:len(s) - 1] = 1
        return tokens, mask
    return make


def supervised_warm_start(model, optimizer, batches: Callable[[random.Random], tuple[torch.Tensor, torch.Tensor]],
                          steps: int, seed: int, runtime: PrecisionRuntime, before_step=None,
                          after_step: Callable[[int], None] | None = None, report_every: int = 0) -> WarmStart:
    """A short supervised start on correct answers (``batches(rng)``: tokens and the mask of the trained
    targets; ``task_batch`` for single-turn tasks, ``rl.workers.agent.transcript_batch`` for multi-turn ones): the
    standard SFT-then-RL recipe. How far it goes is the config's choice: a few steps teach the format and RL
    has most of the way to go (reverse-digits); on addition the model must first cross a plateau that reward
    alone does not get it over, and RL sharpens what the warm start found (docs/results.md, "Main job").

    Its steps are optimizer steps like any other: ``before_step(step - 1)`` (fault injection) runs before each,
    a step with nonfinite gradients is skipped and reported, and the runtime's switches are returned. Batches
    go to the model's device; a step reads its loss and (fused AdamW, which skips on the device) its nonfinite
    flag back in one transfer, so that the layer where NaN entered is promoted before the next forward.
    ``after_step(step)`` runs after each (``tools/warm_start_curve.py`` measures the held-out reward there).
    ``report_every``: a progress line every that many steps (0: none)."""
    rng = random.Random(seed)
    progress = Progress("supervised warm start", 1, steps, "columns: step, loss (nats per answer token)",
                        enabled=report_every > 0)
    device = model_device(model)
    loss_val, skipped, switches = math.nan, [], []
    for step in range(1, steps + 1):
        if before_step is not None:
            before_step(step - 1)
        tokens, mask = (to_device(t, device) for t in batches(rng))
        logp = torch.log_softmax(logits_of(model, tokens[:, :-1]), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        loss = -(logp * mask).sum() / mask.sum().clamp(min=1)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if runtime.optimizer_step(optimizer, norm, step):
            skipped.append(step)
        # the step's one transfer: the loss and the skip flag, before end_step, which then checks at once
        loss_val = float(runtime.fetch(loss.detach().reshape(1))[0])
        for s in runtime.take_skipped():
            skipped.append(s)
        if skipped and skipped[-1] == step:
            log.warning("warm start step %d: nonfinite gradients, optimizer step skipped", step)
        switches += runtime.end_step(step)
        if report_every and (step % report_every == 0 or step == steps):
            progress.line(step, f"warm start {step:>5}/{steps}  loss {loss_val:.3f}")
        if after_step is not None:
            after_step(step)
    return WarmStart(loss_val, skipped, switches)
