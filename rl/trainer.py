"""The RL trainer: GRPO with IcePop on a Megatron policy whose layers are managed by the precision runtime.

``mode = "async"``: the rollout worker (``rl/workers/worker.py``) generates on its own thread with its engine's
(possibly FP8, possibly stale) policy copy while the trainer trains; samples flow through a queue bounded by
admission control (``rl/algo/staleness.py``); weights flow back as versioned snapshots after every optimizer
step. ``mode = "sync"`` generates, then trains, alternately: the baseline. Every generated sample is
trained on, dropped with a reason, or still in flight at the end; the run checks that balance.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch

from precisionrt.config import Checked, Every, Range
from precisionrt.layers.linear import precision_layers
from precisionrt.runtime.precision_runtime import PrecisionRuntime
from precisionrt.distributed.syncs import to_device
from rl.algo.attribution import MismatchAttribution, MismatchPolicyConfig
from rl.inference.engine import InferenceEngine
from rl.envs import Problem, Task
from rl.algo.losses import LossConfig, LossInputs, finish_metrics, flat_groups, grpo_advantages, ppo_loss_terms
from rl.algo.mismatch import flatten, unflatten
from rl.inference.rollout import CHANNEL_SCALE, RolloutConfig, generate, rollout_precisions
from rl.inference.decode import logits_of, model_device
from rl.algo.staleness import StalenessConfig, StalenessController
from rl.workers.worker import Group, RolloutWorker

log = logging.getLogger(__name__)


@dataclass
class RLAlgoConfig(Checked):
    """The ``[rl]`` table."""

    max_staleness: Annotated[int, Range(ge=0, le=10**6)] = 2
    """Samples more than this many policy versions old are never trained: admission control keeps them from
    starting, and those that still arrive are dropped (``stale``). 0 is on-policy."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The ``[rl.loss]`` table: PPO clip, the train/inference mismatch correction (IcePop, TIS, none), level."""
    group_size: Annotated[int, Range(ge=2, le=4096)] = 8
    """Completions per prompt; GRPO normalises rewards within each group."""
    advantage_std: Literal["sample", "population", "none"] = "sample"
    """GRPO's divisor: the group's sample std (verl, slime and AReaL's default), its population std, or
    ``none`` (Dr. GRPO: no division, so easy and hard prompts are not re-weighted)."""
    prompts_per_step: Annotated[int, Range(ge=1, le=2**16)] = 16
    entropy_coef: Annotated[float, Range(ge=0, le=10)] = 0.0
    """Bonus on the policy's entropy over completion tokens (against collapse)."""
    max_consecutive_rollout_failures: Annotated[int, Range(ge=1, le=10**9)] = 20
    """The run ends with the last error after this many failed rollouts in a row."""
    max_failed_rollout_fraction: Annotated[float, Range(gt=0, le=1)] = 0.5
    """... or once more than this share of all rollouts failed (counted from five batches of failures on)."""
    attribution_every: Every = 0
    """Every this many optimizer steps, measure one rollout layer's share of the train/inference mismatch
    (``rl/algo/attribution.py``, round-robin over the rollout's FP8 layers); 0: off."""
    attribution_samples: Annotated[int, Range(ge=1, le=2**16)] = 8
    """Samples of the step's batch that the attribution scores (twice, on the rollout engine)."""
    error_masking: bool = False
    """Multi-turn tasks (GLM-5): an action whose tool call failed through the policy's own fault (a malformed
    call, wrong arguments) is not trained, in RL and in the warm start; the actions that recover are."""
    groups_in_flight: Annotated[int, Range(ge=1, le=2**16)] = 64
    """Multi-turn tasks, async mode: GRPO groups in flight at once (each still admitted by staleness control)."""
    mismatch_policy: MismatchPolicyConfig = field(default_factory=MismatchPolicyConfig)
    """The ``[rl.mismatch_policy]`` table: promote the layer that carries the mismatch (off by default)."""
    ppo_minibatches: Annotated[int, Range(ge=1, le=2**16)] = 1
    """Optimizer steps per epoch over a trainer batch, each on a shuffled share of its samples (verl's
    ``ppo_mini_batch_size`` as a count); divides prompts_per_step x group_size. Each is a runtime step too."""
    sync_bucket_mb: Annotated[float, Range(gt=0, le=2**20)] = 256.0
    """Weight sync to the rollout engines: the largest bucket, in MiB, that a publication copies at once
    (``rl/inference/weight_sync.py``; a tensor larger than that travels in a bucket of its own)."""
    ppo_epochs: Annotated[int, Range(ge=1, le=1024)] = 1
    """Passes over each trainer batch (verl's ``ppo_epochs``). pi_prox, the PPO clip's anchor, is the policy
    before the batch's first step, computed once per batch."""

    @property
    def steps_per_batch(self) -> int:
        """Optimizer (and runtime) steps per trainer batch."""
        return self.ppo_minibatches * self.ppo_epochs

    def validate(self) -> None:
        if (self.prompts_per_step * self.group_size) % self.ppo_minibatches:
            raise ValueError(f"ppo_minibatches ({self.ppo_minibatches}) must divide prompts_per_step x group_size "
                             f"({self.prompts_per_step * self.group_size} samples): minibatches are of equal size")
        if self.mismatch_policy.promote_share > 0 and self.attribution_every == 0:
            raise ValueError("mismatch_policy.promote_share acts on the attribution's measurements: set "
                             "attribution_every > 0")


@dataclass
class ReadBack:
    """What a trainer batch learns from its one transfer."""
    applied: list[bool]      # per sample: trained by at least one applied optimizer step
    k3: list[float]          # per sample: k3 of pi_prox against the behaviour policy
    per_step: list[dict]     # per optimizer step: its metrics
    summary: dict            # the batch's reward summary
    skipped_steps: set[int]  # optimizer steps skipped for nonfinite gradients


class RLTrainer:
    def __init__(self, model, runtime: PrecisionRuntime, optimizer, engine: InferenceEngine, task: Task,
                 algo: RLAlgoConfig, mode: str, seed: int, max_new_tokens: int, rollout: RolloutConfig,
                 worker=RolloutWorker, **worker_args):
        """``worker``: the rollout worker class (``rl.workers.agent_worker.AgentRolloutWorker`` for multi-turn tasks),
        built with ``worker_args`` beside the common arguments."""
        self.model, self.runtime, self.optimizer, self.engine, self.task = model, runtime, optimizer, engine, task
        self.device = model_device(model)
        self.algo, self.mode, self.seed = algo, mode, seed
        self.batch_samples = algo.prompts_per_step * algo.group_size
        self.ctrl = StalenessController(StalenessConfig(algo.max_staleness), self.batch_samples)
        self.loss_cfg = algo.loss
        self.max_new_tokens = max_new_tokens
        self.rollout_mode = rollout.precision
        self.temperature = rollout.temperature if rollout.temperature > 0 else 1.0
        self.skipped_steps: list[int] = []   # optimizer steps skipped for nonfinite gradients
        # the trainer's precisions travel to the rollout engine as a versioned map, with the weights
        self.map_version, self._map = 0, runtime.forward_precisions()
        self.precision_changes: list[dict] = []   # {map_version, step, layers: {name: precision}}
        self.trained_by_map: Counter = Counter()   # trained samples by the map version that generated them
        self.mismatch_by_map: dict[int, list] = {}   # map version -> [k3 summed over tokens, tokens]
        self.attribution = MismatchAttribution(algo.attribution_every, algo.attribution_samples)
        self.rollout_bf16: dict[str, dict] = {}   # layers promoted on the rollout side -> why (step, share, k3)
        self._map_bf16: set[str] = set()   # ... as the last published map has them
        self.worker = worker(engine, task, self.ctrl, algo, max_new_tokens, seed, policy_state(model), self._map,
                             **worker_args)
        self.queue, self.counters = self.worker.queue, self.worker.counters

    # --------------------------------------------------------------------------------------- training

    def next_batch(self, timeout: float = 120.0) -> list[Group]:
        batch: list[Group] = []
        while len(batch) < self.algo.prompts_per_step:
            while self.mode == "sync" and self.queue.empty():  # every group of a batch may have been dropped
                if not self.worker.rollout_once():
                    raise RuntimeError("sync mode: admission control refused a rollout (accounting is broken)")
            t0 = time.perf_counter()
            group = None
            while group is None:   # short waits: a dead worker is reported at once, not after the timeout
                self.worker.raise_if_died()
                try:
                    group = self.queue.get(timeout=0.05)
                except queue.Empty:
                    if time.perf_counter() - t0 > timeout:
                        raise RuntimeError(f"no rollouts for {timeout:.0f} s; rollout errors: "
                                           f"{self.counters.errors[-3:]}") from None
            self.counters.trainer_wait += time.perf_counter() - t0
            if self.ctrl.is_stale(group.version):
                self.ctrl.drop(len(group.completions), "stale")
                continue
            batch.append(group)
        return batch

    def loss_inputs(self, batch: list[Group]) -> tuple[LossInputs, torch.Tensor, torch.Tensor]:
        """The batch's loss inputs with pi_theta's log-probs (with grad) and entropy, and its rewards (all on the
        policy's device)."""
        tokens, mask, logp_infer, rewards, adv = self._batch_tensors(batch)
        logp, entropy = self._policy_logp(tokens, mask)
        return LossInputs(logp=logp * mask, logp_prox=(logp * mask).detach(), logp_infer=logp_infer,
                          advantages=adv, mask=mask), rewards, entropy

    def _batch_tensors(self, batch: list[Group]):
        """tokens, completion mask, behaviour log-probs, rewards and GRPO advantages of the batch's samples, on
        the policy's device (built on the host, copied without a synchronisation)."""
        comps = [c for g in batch for c in g.completions]
        seqs = [list(c.prompt) + c.tokens for c in comps]
        width = max(len(s) for s in seqs)
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width - 1)
        logp_infer = torch.zeros(len(seqs), width - 1)
        for i, (c, s) in enumerate(zip(comps, seqs)):
            tokens[i, :len(s)] = torch.tensor(s)
            start = len(c.prompt) - 1  # logits at position t predict token t + 1
            trained = 1 if c.mask is None else torch.tensor(c.mask, dtype=torch.float32)   # episodes: actions only
            mask[i, start:start + len(c.tokens)] = trained
            logp_infer[i, start:start + len(c.tokens)] = torch.tensor(c.logp_infer)
        rewards = torch.tensor([r for g in batch for r in g.rewards], dtype=torch.float64)
        tokens, mask, logp_infer, rewards = (to_device(t, self.device) for t in (tokens, mask, logp_infer, rewards))
        adv = grpo_advantages(rewards, self.algo.group_size, std=self.algo.advantage_std)
        return tokens, mask, logp_infer, rewards, adv

    def _policy_logp(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pi_theta's log-probs of ``tokens`` and its entropy on completion tokens (watched for collapse,
        optionally rewarded: rl.entropy_coef)."""
        logits = logits_of(self.model, tokens[:, :-1]) / self.temperature
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        entropy = -((logp_all.exp() * logp_all).sum(-1) * mask).sum() / mask.sum().clamp(min=1)
        return logp, entropy

    def train_step(self, step: int, grad_clip: float) -> dict:
        """One trainer batch: ``rl.ppo_epochs`` x ``rl.ppo_minibatches`` optimizer steps (one by default), each a
        runtime step (numbered on from the runtime's last, so the switch log counts optimizer steps); then the
        batch's accounting and one weight publication.

        Host synchronisation: one device->host transfer for the whole batch, at the end of its last optimizer
        step, carrying every step's metrics and nonfinite flags. With an optimizer that skips on the device
        (``found_inf``: a fused Adam/AdamW) nothing else is read; with another, each step reads its flag first
        (``should_skip_step``)."""
        t0 = time.perf_counter()
        batch = self.next_batch()
        t_batch = time.perf_counter()
        n = sum(len(g.completions) for g in batch)
        if self.algo.steps_per_batch == 1:
            inputs, rewards, entropy = self.loss_inputs(batch)
            parts = [(torch.arange(n, device=self.device), inputs, entropy)]
        else:
            tokens, mask, logp_infer, rewards, adv = self._batch_tensors(batch)
            with torch.no_grad():   # pi_prox: the policy before the batch's first step, once per batch
                old = self._policy_logp(tokens, mask)[0] * mask
            inputs = LossInputs(logp=old, logp_prox=old, logp_infer=logp_infer, advantages=adv, mask=mask)
            parts = self._minibatches(step, tokens, mask, inputs)
        attributed = self.attribution.due(step)
        extra = self._attribute(batch, inputs) if attributed else {}   # on pi_prox, before the update
        events, stats, host_skipped, first = [], [], set(), self.runtime.last_step
        last = first + self.algo.steps_per_batch
        for k, (rows, part, entropy) in enumerate(parts, start=first + 1):
            loss, terms = ppo_loss_terms(part, self.loss_cfg)
            (loss - self.algo.entropy_coef * entropy).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            # a fused optimizer skips, if it must, by itself; the flag comes with the batch's one transfer
            if self.runtime.optimizer_step(self.optimizer, grad_norm, k):
                host_skipped.add(k)
            stats.append({"rows": rows, "loss": loss.detach(), "entropy": entropy.detach(),
                          "grad_norm": grad_norm.detach(), **terms})
            if k < last:   # the switches apply at the next forward, on both sides
                events += self.runtime.end_step(k)
        summary = {"reward": rewards.mean(),
                   "zero_variance_groups": flat_groups(rewards, self.algo.group_size).double().mean()}
        back = self._read_back(stats, summary, first, host_skipped, n)
        events += self.runtime.end_step(last)   # at once after a skip: the layer where NaN entered is promoted
        applied, k3, batch_summary = back.applied, back.k3, back.summary
        metrics = {**_combine(back.per_step), **extra}
        steps_applied = self.algo.steps_per_batch - len(back.skipped_steps)
        skipped = not any(applied)
        by_map = self._split_by_map(batch, k3)
        staleness = [self.ctrl.staleness(g.version) for g in batch]
        if attributed:
            events += self._act_on_mismatch(step)
        self._publish_precisions(step)         # the map goes out first, the weights (if any) join it
        comps = [(g.version, c.map_version) for g in batch for c in g.completions]
        if skipped:
            self.skipped_steps.append(step)
        # a sample none of whose steps applied taught nothing: dropped with its reason. If no step applied the
        # weights did not change: the policy version stays and no weights are published
        if not all(applied):
            self.ctrl.drop(applied.count(False), "skipped_step")
        if not skipped:
            self.ctrl.trained([v for (v, _), t in zip(comps, applied) if t])
            self.trained_by_map.update(m for (_, m), t in zip(comps, applied) if t)
            # publish first, then advance: a rollout admitted by the new version must find its weights
            self.worker.publish(self.ctrl.version + 1, policy_state(self.model))
            self.ctrl.advance()
        processed = sum(len(c.prompt) + len(c.tokens) for g in batch for c in g.completions) * self.algo.ppo_epochs
        return {**batch_summary,
                "trainer_tokens_per_s": processed / (time.perf_counter() - t_batch),
                "skipped": skipped, "staleness": staleness, "staleness_mean": sum(staleness) / len(staleness),
                "staleness_max": max(staleness), "queue": self.queue.qsize(), "events": events,
                "step_time": time.perf_counter() - t0,
                "map_version_oldest": min(c.map_version for g in batch for c in g.completions),
                "k3_kl_by_map_version": by_map, "minibatch_steps": steps_applied,
                **metrics}

    def _read_back(self, stats: list[dict], summary: dict, first: int, host_skipped: set[int], n: int) -> "ReadBack":
        """The batch's one device->host transfer (every step's statistics, the summary, the device-side skip
        flags), unpacked: which samples some applied step trained, each sample's k3, each step's metrics."""
        host = self.runtime.fetch(torch.cat([flatten(s) for s in stats + [summary]])).tolist()
        skipped_steps = host_skipped | set(self.runtime.take_skipped())
        applied, k3, per_step, i = [False] * n, [0.0] * n, [], 0
        for k, s in enumerate(stats, start=first + 1):
            width = sum(v.numel() for v in s.values())
            m = unflatten(s, host[i:i + width])
            i += width
            for r, v in zip(m.pop("rows"), m.pop("k3_per_sequence")):
                k3[int(r)] = v   # pi_prox against the behaviour policy: the same in every epoch
                applied[int(r)] |= k not in skipped_steps
            per_step.append(finish_metrics(m))
        return ReadBack(applied, k3, per_step, unflatten(summary, host[i:]), skipped_steps)

    def _minibatches(self, step: int, tokens: torch.Tensor, mask: torch.Tensor, full: LossInputs):
        """(rows, loss inputs, entropy) of each optimizer step of the batch: every epoch a fresh shuffle (seeded by
        the run's seed and the step: the same on resume), split into ``ppo_minibatches`` equal parts, pi_theta
        computed for each part as it comes (after the previous part's update). ``rows``: on the device."""
        n = tokens.shape[0]
        size = n // self.algo.ppo_minibatches
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        for _ in range(self.algo.ppo_epochs):
            for rows in to_device(torch.randperm(n, generator=gen), self.device).split(size):
                logp, entropy = self._policy_logp(tokens[rows], mask[rows])
                yield rows, LossInputs(logp=logp * mask[rows], logp_prox=full.logp_prox[rows],
                                       logp_infer=full.logp_infer[rows], advantages=full.advantages[rows],
                                       mask=mask[rows]), entropy

    def _split_by_map(self, batch: list[Group], k3_per_sequence: list[float]) -> dict[str, dict]:
        """``rollout_corr/k3_kl`` of the step's samples split by the precision-map version that made them (and
        summed into the run's split): ``{version: {"k3_kl": ..., "samples": n}}``."""
        step_acc: dict[int, list] = {}
        for c, k3 in zip((c for g in batch for c in g.completions), k3_per_sequence):
            for acc in (self.mismatch_by_map.setdefault(c.map_version, [0.0, 0]),
                        step_acc.setdefault(c.map_version, [0.0, 0, 0])):
                acc[0], acc[1] = acc[0] + k3, acc[1] + c.trained_tokens
            step_acc[c.map_version][2] += 1
        return {str(v): {"k3_kl": s / max(n, 1), "samples": k} for v, (s, n, k) in sorted(step_acc.items())}

    def _act_on_mismatch(self, step: int) -> list:
        """``[rl.mismatch_policy]``: promote the layer the last attribution found carrying the mismatch."""
        policy, m = self.algo.mismatch_policy, self.attribution.culprit(self.algo.mismatch_policy)
        if m is None or m.layer in self.rollout_bf16:
            return []
        signals = {"mismatch_share": m.share, "k3_kl": m.k3_kl}
        self.rollout_bf16[m.layer] = {"step": step, "scope": policy.scope, **signals}
        log.info("step %d: %s carries %.0f%% of the mismatch (k3 %.2e): promoted on the %s side", step,
                 m.layer, 100 * m.share, m.k3_kl, "rollout" if policy.scope == "rollout" else "rollout and trainer")
        if policy.scope == "both":   # the mismatch is the forward pass's: the trainer's fprop of the layer
            return self.runtime.promote(f"{m.layer}:fprop", "mismatch", step, severity=m.share, signals=signals)
        return []

    def _attribute(self, batch: list[Group], inputs: LossInputs) -> dict[str, float]:
        comps = [c for g in batch for c in g.completions][: self.algo.attribution_samples]
        rows = inputs.logp_prox[:len(comps)].tolist()   # one transfer
        logp_train = [row[len(c.prompt) - 1:len(c.prompt) - 1 + len(c.tokens)] for row, c in zip(rows, comps)]
        with self.worker.engine_lock:   # the engine is not the worker's meanwhile
            return self.attribution.measure(self.engine, comps, logp_train)

    def _publish_precisions(self, step: int) -> None:
        """The map the rollout follows: each layer's forward (fprop) precision, the only GEMM inference runs."""
        precisions, forced = self.runtime.forward_precisions(), set(self.rollout_bf16)
        if precisions == self._map and forced == self._map_bf16:
            return
        self.map_version += 1
        changed = {n: p for n, p in precisions.items() if self._map[n] != p}
        change = {"map_version": self.map_version, "step": step, "layers": changed}
        if forced != self._map_bf16:
            change["rollout_bf16"] = sorted(forced - self._map_bf16)
        self.precision_changes.append(change)
        self._log_rollout_switches(step, precisions, forced)
        self._map, self._map_bf16 = precisions, forced
        self.worker.publish_precisions(self.map_version, precisions, forced)

    def _log_rollout_switches(self, step: int, precisions: dict[str, str], forced: set[str]) -> None:
        """A ``rollout_switch`` record in the switch log for every layer the new map changes on the rollout side."""
        if self.runtime.events is None:
            return
        capable = {n: layer.fp8_capable for n, layer in self.runtime.layers.items()}
        before = rollout_precisions(self.rollout_mode, self._map, self._map_bf16, capable)
        after = rollout_precisions(self.rollout_mode, precisions, forced, capable)
        for name in (n for n in after if after[n] != before[n]):
            why = self.rollout_bf16.get(name) if name not in self._map_bf16 else None
            signals = {} if why is None else {k: why[k] for k in ("mismatch_share", "k3_kl")}
            self.runtime.events.rollout_switch(step, name, before[name], after[name],
                                               "mismatch" if why else "follow", self.map_version, signals)

    def present_samples(self) -> int:
        """Samples physically in flight: what the queue holds (call with the rollout worker stopped)."""
        return self.worker.present_samples()

    # ----------------------------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict:
        with self.ctrl.lock:   # the rollout worker updates the counters concurrently
            a = self.ctrl.acct
            version = self.ctrl.version
            acct = {"generated": a.generated, "trained": a.trained, "dropped": dict(a.dropped),
                    "in_flight": a.in_flight, "staleness_trained": dict(a.staleness_trained),
                    "failed_rollouts": a.failed_rollouts, "worker_lost": a.worker_lost}
        return {"version": version, **self.worker.state_dict(), "acct": acct, "skipped_steps": list(self.skipped_steps),
                "map_version": self.map_version, "precision_changes": self.precision_changes,
                "rollout_bf16": self.rollout_bf16,
                "trained_by_map": dict(self.trained_by_map), "mismatch_by_map": self.mismatch_by_map}

    def load_state_dict(self, sd: dict) -> None:
        """Resume: samples that were in flight when the checkpoint was taken are gone with the old process;
        they are counted as dropped (``lost_on_restart``) so the accounting stays whole."""
        self.skipped_steps = list(sd.get("skipped_steps", []))
        a, acct = self.ctrl.acct, sd["acct"]
        a.generated, a.trained = acct["generated"], acct["trained"]
        a.failed_rollouts = acct.get("failed_rollouts", 0)
        a.worker_lost = acct.get("worker_lost", 0)
        a.dropped.update(acct["dropped"])
        a.staleness_trained.update({int(k): v for k, v in acct["staleness_trained"].items()})
        if acct["in_flight"]:
            a.dropped["lost_on_restart"] += acct["in_flight"]
        self.ctrl.version = sd["version"]
        self.ctrl.accepted, self.ctrl.running = a.trained, 0
        self.map_version, self._map = int(sd.get("map_version", 0)), self.runtime.forward_precisions()
        self.precision_changes = list(sd.get("precision_changes", []))
        self.trained_by_map = Counter({int(k): v for k, v in sd.get("trained_by_map", {}).items()})
        self.mismatch_by_map = {int(k): list(v) for k, v in sd.get("mismatch_by_map", {}).items()}
        self.rollout_bf16 = dict(sd.get("rollout_bf16", {}))
        self._map_bf16 = set(self.rollout_bf16)
        self.worker.load_state_dict(sd, self.ctrl.version, policy_state(self.model), self.map_version, self._map,
                                    self._map_bf16)

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self.mode == "async":
            self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    def evaluate(self, problems: list[Problem]) -> float:
        """Mean held-out reward of the trainer's policy, greedy decoding."""
        return greedy_reward(self.model, self.task, problems, self.max_new_tokens, self.engine.model_cfg.seq_length)


def _combine(per_step: list[dict]) -> dict:
    """The metrics of a batch's optimizer steps as one row: extremes (``*_min``, ``*_max``) over the steps, every
    other metric their mean."""
    if len(per_step) == 1:
        return per_step[0]
    out = {}
    for key in per_step[0]:
        values = [m[key] for m in per_step]
        out[key] = min(values) if key.endswith("_min") else max(values) if key.endswith("_max") \
            else sum(values) / len(values)
    return out


def greedy_reward(model, task: Task, problems: list[Problem], max_new_tokens: int, seq_length: int) -> float:
    """Mean reward of ``model``'s greedy answers to ``problems``: the held-out measure of every RL figure."""
    comps = generate(model, [p.prompt for p in problems], max_new_tokens, seq_length, 0.0, 1.0,
                     torch.Generator(), stop_ids=task.stop_ids)   # greedy: draws nothing
    return sum(task.reward(p, task.decode(c.tokens)) for p, c in zip(problems, comps)) / len(problems)


def policy_state(model) -> dict:
    """The weights to publish: the model's own tensors (the weight channel copies them). An injected fault's
    channel scaling (``inject.kind = "outlier"`` / ``"spike"``) travels with them (``<layer>.channel_scale``): a
    real outlier lives in what both sides compute with."""
    state = {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for name, layer in precision_layers(model).items():
        if layer.channel_scale is not None:
            state[f"{name}.{CHANNEL_SCALE}"] = layer.channel_scale.detach()
    return state
