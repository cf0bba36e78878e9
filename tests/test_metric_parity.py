"""Every metric and loss that carries a peer's name against that peer's own formula.

Each reference below is re-written here from the peer's published source (repository and path in its
comment), in plain torch, independently of ``rl/``: verl's ``rollout_corr/*`` metrics, policy loss and
``agg_loss``; slime's TIS / IcePop losses and their ``sum_of_sample_mean`` reduction; NeMo-RL's
``token_mult_prob_error``; AReaL's decoupled PPO. The inputs are float64 ``[8, 40]`` batches with prompt
offsets and right padding, one all-masked row, and gaps ``d = log pi_prox - log pi_infer`` at sigma 0.05, 0.7
and heavy-tailed (a few tokens at |d| = 25). Everything agrees within 1e-6, except where the module docstrings
of ``rl/algo/mismatch.py`` and ``rl/algo/losses.py`` document an intended difference (tested as such below).
"""

from __future__ import annotations

import math

import pytest
import torch

from rl.algo.losses import LossConfig, LossInputs, grpo_advantages, ppo_loss
from rl.algo.mismatch import mismatch_metrics, to_host

B, T, EMPTY = 8, 40, 5
TOL = dict(rel=1e-6, abs=1e-9)


def batch(sigma: float, seed: int, heavy: bool = False, empty_row: bool = True):
    """(logp, logp_prox, logp_infer, mask, advantages): ragged rows, row EMPTY without completion tokens."""
    g = torch.Generator().manual_seed(seed)
    infer = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 4 + 0.01)
    d = torch.randn(B, T, generator=g, dtype=torch.float64) * sigma
    if heavy:   # heavy tails: 5% of tokens ten times wider, and two at +-25
        d = torch.where(torch.rand(B, T, generator=g, dtype=torch.float64) < 0.05, d * 10, d)
        d[0, 12], d[2, 20] = 25.0, -25.0
    prox = infer + d
    logp = prox + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3   # the policy being optimised
    mask = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        start = 3 + 2 * i                      # prompt offset
        mask[i, start:start + 5 + (7 * i) % 25] = 1.0   # completion, then right padding
    if empty_row:
        mask[EMPTY] = 0
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logp, prox, infer, mask, adv


CASES = [(0.05, 0, False), (0.7, 1, False), (0.7, 2, True)]
IDS = ["sigma0.05", "sigma0.7", "heavy"]


# --- verl: volcengine/verl, verl/utils/torch_functional.py ---------------------------------------------
def verl_masked_sum(values, mask, axis=None):
    return (values * mask).sum() if axis is None else (values * mask).sum(axis)


def verl_masked_mean(values, mask, axis=None):
    return verl_masked_sum(values, mask, axis) / ((mask.sum() if axis is None else mask.sum(axis)) + 1e-8)


SAFETY_BOUND = 20.0   # verl/trainer/ppo/rollout_corr_helper.py


def verl_offpolicy_metrics(old_log_prob, rollout_log_prob, response_mask):
    """verl/trainer/ppo/rollout_corr_helper.py: compute_offpolicy_metrics."""
    mean_log_prob_training = verl_masked_mean(old_log_prob, response_mask, axis=-1)
    kl = verl_masked_mean(rollout_log_prob - old_log_prob, response_mask)
    log_ratio = old_log_prob - rollout_log_prob
    k3_kl = verl_masked_mean(torch.exp(log_ratio) - log_ratio - 1, response_mask)
    mean_log_prob_rollout = verl_masked_mean(rollout_log_prob, response_mask, axis=-1)
    log_ppl_diff = mean_log_prob_rollout - mean_log_prob_training
    rho_token = torch.exp(torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND))
    chi2_token = verl_masked_mean(rho_token.square(), response_mask) - 1.0
    log_ratio_sum = verl_masked_sum(log_ratio, response_mask, axis=-1)
    chi2_seq = torch.exp(2.0 * torch.clamp(log_ratio_sum, min=-SAFETY_BOUND, max=SAFETY_BOUND)).mean() - 1.0
    return {"rollout_corr/kl": kl, "rollout_corr/k3_kl": k3_kl, "rollout_corr/chi2_token": chi2_token,
            "rollout_corr/chi2_seq": chi2_seq, "rollout_corr/ppl_ratio": torch.exp(log_ppl_diff).mean(),
            "rollout_corr/log_ppl_abs_diff": log_ppl_diff.abs().mean()}


def verl_token_is_ess(log_ratio, response_mask, rollout_is_threshold):
    """verl/trainer/ppo/rollout_corr_helper.py: compute_rollout_correction_weights (token) -> compute_is_metrics."""
    weights = torch.exp(torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND)) * response_mask
    clamped = weights.clamp(min=1.0 / rollout_is_threshold, max=rollout_is_threshold)
    normalized = clamped / (verl_masked_mean(clamped, response_mask) + 1e-8)
    return 1.0 / verl_masked_mean(normalized.square(), response_mask)


def verl_rs_masked_fraction(log_ratio, response_mask, rollout_rs, lower, upper):
    """verl/trainer/ppo/rollout_corr_helper.py: compute_rollout_rejection_mask, "token" or "geometric"."""
    if rollout_rs == "geometric":
        log_ratio = verl_masked_mean(log_ratio, response_mask, axis=-1).unsqueeze(-1)
    weights = torch.exp(torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND)).expand_as(response_mask)
    mask = ((weights >= lower) & (weights <= upper)).double()
    return verl_masked_mean(1 - mask, response_mask)


def verl_policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, clip_ratio, clip_ratio_c,
                     rollout_is_weights=None):
    """verl/trainer/ppo/core_algos.py: compute_policy_loss_vanilla (clip_ratio_c = inf: no dual clip)."""
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio, 1 + clip_ratio)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).double(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).double(),
                                         response_mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    return verl_agg_loss(pg_losses, response_mask, loss_agg_mode), pg_clipfrac, ppo_kl, pg_clipfrac_lower


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode):
    """verl/trainer/ppo/core_algos.py: agg_loss."""
    if loss_agg_mode == "token-mean":
        return verl_masked_mean(loss_mat, loss_mask)
    if loss_agg_mode == "seq-mean-token-sum":
        return torch.mean(torch.sum(loss_mat * loss_mask, dim=-1))
    return torch.mean(torch.sum(loss_mat * loss_mask, dim=-1) / torch.sum(loss_mask, dim=-1))


def verl_tis_weights(log_ratio, response_mask, rollout_is, threshold):
    """verl/trainer/ppo/rollout_corr_helper.py: compute_rollout_correction_weights (truncated)."""
    if rollout_is == "sequence":
        log_ratio = verl_masked_sum(log_ratio, response_mask, axis=-1).unsqueeze(-1)
    w = torch.exp(torch.clamp(log_ratio, min=-SAFETY_BOUND, max=SAFETY_BOUND)).expand_as(response_mask)
    return (w * response_mask).clamp(max=threshold)


def verl_grpo_advantage(scores, group_size, epsilon=1e-6):
    """verl/trainer/ppo/core_algos.py: compute_grpo_outcome_advantage (norm_adv_by_std_in_grpo=True)."""
    out = scores.clone()
    for g in range(len(scores) // group_size):
        s = scores[g * group_size:(g + 1) * group_size]
        out[g * group_size:(g + 1) * group_size] = (s - torch.mean(s)) / (torch.std(s) + epsilon)
    return out


# --- slime: THUDM/slime, slime/backends/megatron_utils/{loss.py, cp_utils.py} -----------------------------
def slime_sample_mean(x, loss_masks):
    """cp_utils.py get_sum_of_sample_mean (cp_size 1), then divided by the samples of the batch."""
    return sum((x_i * m_i).sum() / torch.clamp_min(m_i.sum(), 1) for x_i, m_i in zip(x, loss_masks)) / len(x)


def slime_clipfrac(old_log_probs, rollout_log_probs, tis_clip_low, tis_clip, icepop):
    """loss.py: vanilla_tis_function / icepop_function, their tis_clipfrac (per token)."""
    ratio = torch.exp(old_log_probs - rollout_log_probs)
    if icepop:
        weight = torch.where((ratio >= tis_clip_low) & (ratio <= tis_clip), ratio, torch.zeros_like(ratio))
    else:
        weight = torch.clamp(ratio, min=tis_clip_low, max=tis_clip)
    return (weight != ratio).double(), weight


def slime_pg_loss(log_probs, old_log_probs, advantages, eps_clip):
    """slime/utils/ppo_utils.py: compute_policy_loss (per token)."""
    ratio = torch.exp(log_probs - old_log_probs)
    pg_losses1 = -ratio * advantages
    pg_losses2 = -ratio.clamp(1 - eps_clip, 1 + eps_clip) * advantages
    return torch.maximum(pg_losses1, pg_losses2)


# --- NeMo-RL: NVIDIA/NeMo-RL, nemo_rl/algorithms/loss_functions.py --------------------------------------
def nemo_token_mult_prob_error(prev_logprobs, generation_logprobs, mask):
    return ((torch.exp((generation_logprobs - prev_logprobs).abs()) * mask).sum() / mask.sum())


# --- AReaL: inclusionAI/AReaL, areal/utils/functional.py ppo_actor_loss_fn -----------------------------
def areal_decoupled_loss(logprobs, proximal_logprobs, old_logprobs, advantages, eps_clip, loss_mask, cap):
    loss_mask = loss_mask.bool()
    loss_mask_count = loss_mask.count_nonzero() or 1
    ratio = torch.where(loss_mask, torch.exp(logprobs - proximal_logprobs), 0)
    clipped_ratio = torch.clamp(ratio, 1.0 - eps_clip, 1.0 + eps_clip)
    pg_loss1, pg_loss2 = -advantages * ratio, -advantages * clipped_ratio
    clip_mask = pg_loss1.detach() < pg_loss2.detach()
    pg_loss = torch.max(pg_loss1, pg_loss2)
    behav_imp_weight = (proximal_logprobs - old_logprobs).exp()
    behav_mask = (behav_imp_weight <= cap).logical_and(loss_mask)
    behav_imp_weight = torch.where(behav_mask, behav_imp_weight, 0.0)
    pg_loss = torch.where(loss_mask, pg_loss * behav_imp_weight, 0).sum() / loss_mask_count
    return pg_loss, (clip_mask & loss_mask).count_nonzero() / loss_mask_count


# -------------------------------------------------------------------------------------------------------
def ours(logp, prox, infer, mask, adv, **cfg):
    inp = LossInputs(logp=logp.clone().requires_grad_(True), logp_prox=prox, logp_infer=infer, advantages=adv,
                     mask=mask)
    loss, metrics = ppo_loss(inp, LossConfig(**cfg))
    return loss.item(), metrics


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_verl_offpolicy_metrics(case):
    _, prox, infer, mask, _ = batch(*case)
    got = to_host(mismatch_metrics(prox, infer, mask, tis_cap=2.0))
    for key, want in verl_offpolicy_metrics(prox, infer, mask).items():
        assert got[key] == pytest.approx(want.item(), **TOL), key


def test_an_empty_row_counts_as_verl_counts_it():
    """verl averages chi2_seq, ppl_ratio and log_ppl_abs_diff over every row: an empty row adds exp(0) = 1 (0 to
    log_ppl_abs_diff). Averaging over non-empty rows only (as this project did) is measurably different."""
    _, prox, infer, mask, _ = batch(0.7, 1)
    got = to_host(mismatch_metrics(prox, infer, mask, tis_cap=2.0))
    keep = mask.sum(1) > 0
    without = verl_offpolicy_metrics(prox[keep], infer[keep], mask[keep])
    assert got["rollout_corr/chi2_seq"] != pytest.approx(without["rollout_corr/chi2_seq"].item(), rel=1e-3)
    assert got["rollout_corr/log_ppl_abs_diff"] == pytest.approx(without["rollout_corr/log_ppl_abs_diff"].item()
                                                                 * (B - 1) / B, **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("cap", [1.5, 2.0, 5.0])
def test_verl_is_eff_sample_size(case, cap):
    _, prox, infer, mask, _ = batch(*case)
    got = to_host(mismatch_metrics(prox, infer, mask, tis_cap=cap))["rollout_corr/rollout_is_eff_sample_size"]
    assert got == pytest.approx(verl_token_is_ess(prox - infer, mask, cap).item(), **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_verl_rejection_fraction_of_icepop(case, level):
    """Our IcePop band at token level is verl's token rejection; at sequence level (geometric mean) its
    "geometric" rejection."""
    logp, prox, infer, mask, adv = batch(*case)
    _, m = ours(logp, prox, infer, mask, adv, correction="icepop", level=level)
    want = verl_rs_masked_fraction(prox - infer, mask, "geometric" if level == "sequence" else "token", 0.5, 2.0)
    assert m["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(want.item(), **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("correction", ["icepop", "tis", "none"])
def test_slime_abs_diff_and_tis_clipfrac(case, correction):
    """slime reduces per sample, then over samples; under IcePop its tis_clipfrac counts both ends of the band."""
    logp, prox, infer, mask, adv = batch(*case)
    _, m = ours(logp, prox, infer, mask, adv, correction=correction)
    want_abs = slime_sample_mean((prox - infer).abs(), mask)
    icepop = correction == "icepop"
    clipped, _ = slime_clipfrac(prox, infer, 0.5 if icepop else 0.0, 2.0, icepop)
    assert m["train_rollout_logprob_abs_diff"] == pytest.approx(want_abs.item(), **TOL)
    assert m["tis_clipfrac"] == pytest.approx(slime_sample_mean(clipped, mask).item(), **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nemo_token_mult_prob_error(case):
    _, prox, infer, mask, _ = batch(*case)
    got = to_host(mismatch_metrics(prox, infer, mask, tis_cap=2.0))["token_mult_prob_error"]
    assert got == pytest.approx(nemo_token_mult_prob_error(prox, infer, mask).item(), **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("correction,level", [("none", "token"), ("tis", "token"), ("tis", "sequence")])
def test_verl_policy_loss_clipfrac_and_ppo_kl(case, agg_mode, correction, level):
    """verl's loss with pi_prox as its old_log_prob and its truncated IS weights (sequence: the product) is our
    decoupled loss; verl's seq-mean-token-mean divides an empty row by zero, so that mode is compared on a batch
    without one (slime's reduction, next test, covers the empty row)."""
    logp, prox, infer, mask, adv = batch(*case, empty_row=agg_mode != "seq-mean-token-mean")
    loss, m = ours(logp, prox, infer, mask, adv[:, None].expand(B, T), correction=correction, level=level,
                   sequence_ratio="product", agg_mode=agg_mode)
    weights = None if correction == "none" else verl_tis_weights(prox - infer, mask, level, 2.0)
    want, clipfrac, ppo_kl, _ = verl_policy_loss(prox, logp, adv[:, None], mask, agg_mode, 0.2, math.inf, weights)
    assert loss == pytest.approx(want.item(), **TOL)
    assert m["clip_fraction"] == pytest.approx(clipfrac.item(), **TOL)
    assert m["ppo_kl"] == pytest.approx(ppo_kl.item(), **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_verl_dual_clip(case):
    logp, prox, infer, mask, adv = batch(*case)
    logp = prox + (logp - prox) * 6   # ratios up to e^6: the dual clip binds
    loss, m = ours(logp, prox, infer, mask, adv, correction="none", clip_ratio_c=3.0)
    want, clipfrac, _, lower = verl_policy_loss(prox, logp, adv[:, None], mask, "token-mean", 0.2, 3.0)
    assert lower > 0.01, "the case must exercise the dual clip"
    assert loss == pytest.approx(want.item(), **TOL)
    assert m["clip_fraction_lower"] == pytest.approx(lower.item(), **TOL)
    assert m["clip_fraction"] == pytest.approx(clipfrac.item(), **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("correction", ["icepop", "tis"])
def test_slime_tis_and_icepop_losses_with_its_per_sample_reduction(case, correction):
    logp, prox, infer, mask, adv = batch(*case)
    loss, _ = ours(logp, prox, infer, mask, adv, correction=correction, agg_mode="seq-mean-token-mean")
    icepop = correction == "icepop"
    _, weight = slime_clipfrac(prox, infer, 0.5 if icepop else 0.0, 2.0, icepop)
    want = slime_sample_mean(slime_pg_loss(logp, prox, adv[:, None], 0.2) * weight, mask)
    assert loss == pytest.approx(want.item(), **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_areal_decoupled_ppo(case):
    """AReaL's behave_imp_weight cap zeroes ratios above it: our IcePop with a band of (tiny, cap)."""
    logp, prox, infer, mask, adv = batch(*case)
    loss, m = ours(logp, prox, infer, mask, adv, correction="icepop", icepop_band=(1e-30, 2.0))
    want, clipfrac = areal_decoupled_loss(logp, prox, infer, adv[:, None], 0.2, mask, 2.0)
    assert loss == pytest.approx(want.item(), **TOL)
    assert m["clip_fraction"] == pytest.approx(clipfrac.item(), **TOL)


def test_clip_fraction_counts_where_the_clipped_term_is_taken():
    """|ratio - 1| > eps with an advantage that makes the unclipped term the larger loss is not clipping: the peers
    do not count it (this project's old definition did: 0.66 vs 0.29 in the review's case)."""
    logp, prox, infer, mask, adv = batch(0.7, 1)
    _, m = ours(logp, prox, infer, mask, adv)
    ratio = torch.exp(logp - prox)
    outside = (((ratio - 1).abs() > 0.2) * mask).sum() / mask.sum()
    assert 0 < m["clip_fraction"] < outside.item() - 0.1


@pytest.mark.parametrize("group_size", [4, 8])
def test_verl_grpo_advantages(group_size):
    g = torch.Generator().manual_seed(group_size)
    scores = torch.rand(8 * group_size, generator=g, dtype=torch.float64)
    got = grpo_advantages(scores, group_size)
    assert got.tolist() == pytest.approx(verl_grpo_advantage(scores, group_size).tolist(), rel=1e-6, abs=1e-7)
    population = grpo_advantages(scores, group_size, std="population")
    assert (got / population).tolist() == pytest.approx([math.sqrt((group_size - 1) / group_size)] * len(got), rel=1e-5)   # eps 1e-6 aside
