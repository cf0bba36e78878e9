"""RL losses: GRPO advantages, the PPO clipped surrogate, and behaviour-correction weights (IcePop, TIS).

Three policies meet in an asynchronous trainer (AReaL's decoupled PPO):

* pi_infer: the (stale, possibly FP8) rollout copy that sampled the tokens: ``logp_infer``;
* pi_prox:  the trainer's policy before this update: ``logp_prox`` (detached);
* pi_theta: the policy being optimised: ``logp``.

The PPO ratio ``pi_theta / pi_prox`` is clipped as usual; the train/inference mismatch ``pi_prox / pi_infer`` is a
separate detached per-token weight: IcePop (contract C8) keeps it where it lies in ``[low, high]`` and zeroes
the token outside (no gradient), TIS truncates it at C, ``none`` is 1.

``objective = "naive"`` is the baseline AReaL compares against: standard PPO with the behaviour policy as the
old policy (the ratio ``pi_theta / pi_infer`` clipped, no separate weight), which with stale samples clips
most tokens out of the gradient.

How the loss matches the field's (``tests/test_metric_parity.py`` re-writes each peer from its source):

* the clipped surrogate, its clip fraction (tokens where the clipped term is the one taken: verl's
  ``pg_clipfrac``, AReaL's ``clip_mask``), ``rl/ppo_kl`` (k1 of pi_prox against pi_theta) and the optional dual
  clip (``clip_ratio_c``, for negative advantages) are verl's ``compute_policy_loss_vanilla``
  (volcengine/verl: verl/trainer/ppo/core_algos.py) with pi_prox as its ``old_log_prob``: verl's own
  decoupled form;
* ``agg_mode`` is verl's ``agg_loss``: ``token-mean`` (verl's default and ours), ``seq-mean-token-sum``,
  ``seq-mean-token-mean`` (slime's default ``sum_of_sample_mean``, THUDM/slime:
  slime/backends/megatron_utils/cp_utils.py). An all-masked row counts as a row of loss 0, as in slime; verl's
  ``seq-mean-token-mean`` divides it by zero (NaN);
* token-level TIS is verl's truncated IS weight and slime's ``vanilla_tis_function``; token-level IcePop is
  slime's ``icepop_function`` and AReaL's decoupled loss with a ``behave_imp_weight`` band
  (inclusionAI/AReaL: areal/utils/functional.py ``ppo_actor_loss_fn``);
* sequence level: ``sequence_ratio = "geo_mean"`` (default) weights a sequence by exp(mean_t d), GSPO/AReaL's
  length-independent ratio; ``"product"`` by exp(sum_t d) clamped to exp(+-20), verl's ``rollout_is:
  sequence`` and NeMo-RL's sequence-level importance weight;
* GRPO advantages divide by the group's sample std (``rl.advantage_std = "sample"``, the default of verl's
  ``compute_grpo_outcome_advantage``, slime and AReaL), or by the population std, or by nothing (Dr. GRPO).

Intended differences: the token mean's denominator is every completion token, also those the correction or
a guard zeroes (AReaL and NeMo-RL do the same; verl's rejection removes them from its response mask and so
from the denominator); a group whose rewards are all equal has advantages of exactly 0 (verl divides the
rounding noise of its mean by eps = 1e-6).
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from precisionrt.config import Checked, Range
from rl.algo import mismatch

__all__ = ["AggMode", "Correction", "LossConfig", "LossInputs", "aggregate", "behaviour_weights", "finish_metrics",
           "flat_groups", "grpo_advantages", "icepop_weights", "ppo_loss", "ppo_loss_terms", "tis_weights"]

Correction = Literal["icepop", "tis", "none"]
_EDGE_TOL = 1e-6


def _check_band(low: float, high: float) -> None:
    if not (0 < low < high):
        raise ValueError(f"IcePop band must satisfy 0 < low < high, got [{low}, {high}]")


def icepop_weights(logp_train: torch.Tensor, logp_infer: torch.Tensor, low: float = 0.5,
                   high: float = 2.0) -> torch.Tensor:
    """Contract C8: ``exp(logp_train - logp_infer)`` where that ratio lies in ``[low, high]``, else 0; detached.

    The band is inclusive and compared in log space with a 1e-6 tolerance, so a ratio that is exactly at an
    edge up to float rounding counts as inside."""
    _check_band(low, high)
    log_ratio = logp_train.detach() - logp_infer.detach()
    inside = (log_ratio >= math.log(low) - _EDGE_TOL) & (log_ratio <= math.log(high) + _EDGE_TOL)
    ratio = torch.exp(log_ratio)
    return torch.where(inside, ratio, torch.zeros_like(ratio))


def tis_weights(logp_train: torch.Tensor, logp_infer: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance sampling: ``min(ratio, cap)``, detached."""
    if cap <= 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    return torch.exp(logp_train.detach() - logp_infer.detach()).clamp(max=cap)


def flat_groups(rewards: torch.Tensor, group_size: int, tol: float = 1e-6) -> torch.Tensor:
    """Per group, True where its rewards are all equal (within ``tol`` of the largest magnitude): such a group
    has no GRPO signal. Rewards ordered group by group."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.double().view(-1, group_size)
    spread = r.amax(dim=1) - r.amin(dim=1)
    return spread <= tol * r.abs().amax(dim=1).clamp(min=1.0)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                    std: Literal["sample", "population", "none"] = "sample") -> torch.Tensor:
    """Group-normalised advantages: ``(r - mean_group) / (std_group + eps)``; rewards ordered group by group.
    ``std``: the group's sample std (verl, slime, AReaL), its population std, or ``none`` (no division).

    Exactly 0 for a group whose rewards are equal: otherwise float rounding in the mean, divided by a std of
    about 1e-8 + eps, leaves advantages of +-0.06 (eight rewards of 0.6, 0.8 or 2/3, the partial credits of a
    task) that push the policy in a direction the rewards never said. Computed in float64."""
    flat = flat_groups(rewards, group_size)
    r = rewards.double().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    adv = centred if std == "none" else centred / (r.std(dim=1, unbiased=std == "sample", keepdim=True) + eps)
    return torch.where(flat[:, None], torch.zeros_like(adv), adv).float().view(-1)


@dataclass
class LossInputs:
    """Per-token tensors of one batch, ``[batch, tokens]``; ``mask`` is 1 on completion tokens that train."""

    logp: torch.Tensor          # pi_theta, with grad
    logp_prox: torch.Tensor     # pi_prox (trainer before the update), detached
    logp_infer: torch.Tensor    # pi_infer (behaviour policy that sampled), detached
    advantages: torch.Tensor    # per sequence [batch] or per token [batch, tokens]
    mask: torch.Tensor

    def __post_init__(self) -> None:
        shape = self.logp.shape
        for name in ("logp_prox", "logp_infer", "mask"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"LossInputs.{name} has shape {tuple(getattr(self, name).shape)}, expected {tuple(shape)}")
        if self.advantages.dim() == 1:
            self.advantages = self.advantages[:, None].expand(shape)


AggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]


@dataclass
class LossConfig(Checked):
    clip_eps: Annotated[float, Range(gt=0, lt=1)] = 0.2
    """PPO's clip range on the policy ratio pi_theta / pi_prox."""
    clip_ratio_c: Annotated[float, Range(ge=0, le=1e6)] = 0.0
    """Dual clip (verl's ``clip_ratio_c``, its default 3): for a negative advantage the loss is at most
    ``-A * clip_ratio_c``, so one token whose ratio exploded cannot dominate. 0: off (our default, and AReaL's:
    the behaviour correction already bounds the stale tokens); else > 1."""
    correction: Correction = "icepop"
    """The detached behaviour weight on pi_prox / pi_infer: ``icepop`` (tokens whose ratio leaves
    ``icepop_band`` give no gradient), ``tis`` (the ratio, capped at ``tis_cap``) or ``none``."""
    icepop_band: tuple[Annotated[float, Range(gt=0, le=1e6)], Annotated[float, Range(gt=0, le=1e6)]] = (0.5, 2.0)
    tis_cap: Annotated[float, Range(gt=0, le=1e6)] = 2.0
    objective: Literal["decoupled", "naive"] = "decoupled"
    """``decoupled``: AReaL's decoupled PPO (the ratio on pi_prox, the correction on pi_prox / pi_infer);
    ``naive``: standard PPO on stale samples (the ratio on pi_infer; takes ``correction = "none"``): a baseline."""
    level: Literal["token", "sequence"] = "token"
    """``sequence``: one weight per sequence, from ``sequence_ratio`` of its token ratios."""
    sequence_ratio: Literal["geo_mean", "product"] = "geo_mean"
    """``geo_mean``: exp(mean_t d), GSPO/AReaL (independent of the length: the default, as a product of 40
    ratios of 1.05 is already 7); ``product``: exp(sum_t d), verl's and NeMo-RL's sequence importance weight."""
    agg_mode: AggMode = "token-mean"
    """How per-token losses become one number (verl's ``loss_agg_mode``): ``token-mean`` (verl's default),
    ``seq-mean-token-sum``, ``seq-mean-token-mean`` (slime's default per-sample mean)."""
    veto_threshold: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Drop a whole sequence in which any token's pi_prox / pi_infer falls below this (verl and slime use
    1e-4); 0: off. A guard beside the correction (``rl/algo/mismatch.py``)."""
    seq_max_k2: Annotated[float, Range(ge=0, le=1e6)] = 0.0
    """Drop a whole sequence whose largest token k2 = (log pi_prox / pi_infer)^2 / 2 exceeds this (verl's
    ``seq_max_k2``); 0: off."""

    def validate(self) -> None:
        if not self.icepop_band[0] < self.icepop_band[1]:
            raise ValueError(f"icepop_band must be [low, high] with low < high, got {list(self.icepop_band)}")
        if self.objective == "naive" and self.correction != "none":
            raise ValueError(f'objective "naive" is PPO on pi_infer without a separate correction: set correction '
                             f'= "none" (got {self.correction!r})')
        if 0 < self.clip_ratio_c <= 1:
            raise ValueError(f"clip_ratio_c must be > 1 (or 0: off), got {self.clip_ratio_c}")


def behaviour_weights(inp: LossInputs, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The detached correction weight per token (token level) or per sequence broadcast to its tokens, and for
    IcePop the band's keep mask (1 inside) at the same level."""
    logp_prox, logp_infer = inp.logp_prox, inp.logp_infer
    if cfg.level == "sequence":
        log_ratio = ((logp_prox - logp_infer) * inp.mask).sum(dim=1, keepdim=True)
        if cfg.sequence_ratio == "geo_mean":   # the log-ratio averaged over the sequence
            log_ratio = log_ratio / inp.mask.sum(dim=1, keepdim=True).clamp(min=1)
        else:                                  # verl's safety bound on the product
            log_ratio = log_ratio.clamp(-mismatch.SAFETY_BOUND, mismatch.SAFETY_BOUND)
        logp_prox, logp_infer = log_ratio.expand_as(logp_prox), torch.zeros_like(logp_infer)
    if cfg.correction == "icepop":
        w = icepop_weights(logp_prox, logp_infer, *cfg.icepop_band)
        return w, (w > 0).to(w.dtype)
    if cfg.correction == "tis":
        return tis_weights(logp_prox, logp_infer, cfg.tis_cap), None
    return torch.ones_like(logp_prox), None


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: AggMode) -> torch.Tensor:
    """verl's ``agg_loss`` (see the module docstring for an all-masked row)."""
    if mode == "token-mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    sums = (per_token * mask).sum(dim=1)
    if mode == "seq-mean-token-sum":
        return sums.mean()
    return (sums / mask.sum(dim=1).clamp(min=1)).mean()


def ppo_loss(inp: LossInputs, cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """``ppo_loss_terms`` with its metrics fetched to the host in one transfer (``finish_metrics``)."""
    loss, stats = ppo_loss_terms(inp, cfg)
    return loss, finish_metrics(mismatch.to_host(stats))


def finish_metrics(host: dict) -> dict:
    """``ppo_loss_terms``' statistics, on the host, as metrics: without a completion token there are no
    extremes, and the neutral ratio 1 is reported."""
    if host.pop("tokens") == 0:
        host["ratio_min"] = host["ratio_max"] = 1.0
    return host


def ppo_loss_terms(inp: LossInputs, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Decoupled PPO clipped surrogate with behaviour correction and sequence guards, aggregated by
    ``cfg.agg_mode``.

    Returns the loss and detached statistics, left on the device (``finish_metrics`` turns them, on the host,
    into the metrics): ``masked_fraction`` (tokens given no gradient by the correction or the guards), ratio mean/min/max of pi_prox/pi_infer, ``clip_fraction`` and
    ``ppo_kl`` as verl computes them (and ``clip_fraction_lower`` with the dual clip), the guards' dropped
    shares (``veto_fraction``, ``seq_max_k2_fraction``, of the sequences with completion tokens),
    ``applied_weight_ess`` and the mismatch metrics of ``rl/algo/mismatch.py`` under the names verl, slime and
    NeMo-RL use.
    """
    mask = inp.mask.to(inp.logp.dtype)
    n = mask.sum().clamp(min=1)
    old = (inp.logp_infer if cfg.objective == "naive" else inp.logp_prox).detach()   # PPO's old policy
    ratio = torch.exp(inp.logp - old)
    pg1 = -inp.advantages * ratio
    pg2 = -inp.advantages * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)
    per_token = torch.maximum(pg1, pg2)
    if cfg.clip_ratio_c:
        pg3 = -inp.advantages * cfg.clip_ratio_c
        clipped_lower = (per_token > pg3) & (inp.advantages < 0)
        per_token = torch.where(inp.advantages < 0, torch.minimum(pg3, per_token), per_token)
    keep, vetoed, k2_masked = mismatch.sequence_keep(inp.logp_prox, inp.logp_infer, mask, cfg.veto_threshold,
                                                     cfg.seq_max_k2)
    band_weight, band_kept = behaviour_weights(inp, cfg)
    weight = band_weight * keep[:, None]
    loss = aggregate(weight * per_token, mask, cfg.agg_mode)

    with torch.no_grad():
        behave = torch.exp(inp.logp_prox - inp.logp_infer)
        on = mask > 0
        n_seq = (mask.sum(dim=1) > 0).sum().clamp(min=1)
        k3_seq = mismatch.sequence_k3(inp.logp_prox, inp.logp_infer, mask)
        big = torch.finfo(behave.dtype).max
        w = weight * mask
        w_sq = w.square().sum()
        stats = {
            "masked_fraction": ((weight == 0) & on).sum() / n,
            "ratio_mean": (behave * mask).sum() / n,
            "ratio_min": torch.where(on, behave, torch.full_like(behave, big)).amin(),
            "ratio_max": torch.where(on, behave, torch.full_like(behave, -big)).amax(),
            "clip_fraction": ((pg2 > pg1) & on).sum() / n,
            "ppo_kl": ((old - inp.logp.detach()) * mask).sum() / n,
            "veto_fraction": vetoed.sum() / n_seq,
            "seq_max_k2_fraction": k2_masked.sum() / n_seq,
            "applied_weight_ess": torch.where(w_sq > 0, w.sum().square() / (n * w_sq), torch.zeros_like(w_sq)),
            **mismatch.mismatch_metrics(inp.logp_prox, inp.logp_infer, mask, tis_cap=cfg.tis_cap,
                                        icepop_band=cfg.icepop_band if cfg.correction == "icepop" else None,
                                        band_kept=band_kept, k3_per_sequence=k3_seq),
            "tokens": mask.sum(),
            "k3_per_sequence": k3_seq,   # for the split by precision-map version
        }
        if cfg.clip_ratio_c:
            stats["clip_fraction_lower"] = (clipped_lower & on).sum() / n
    return loss, stats
