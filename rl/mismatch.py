"""Train/inference mismatch: the metrics the field reports, and the sequence-level guards beside IcePop.

Per token, with ``rho = pi_train / pi_infer`` (``pi_train``: the trainer's policy before the update, pi_prox;
``pi_infer``: the rollout engine's, which sampled the token) and ``d = log rho``, over completion tokens:

==================================  ===========================================================  ==========
name                                definition                                                   from
==================================  ===========================================================  ==========
``rollout_corr/kl``                 mean(-d): KL(pi_infer || pi_train), direct estimator         verl
``rollout_corr/k3_kl``              mean(rho - 1 - d), Schulman's k3                             verl
``rollout_corr/chi2_token``         mean(rho^2) - 1 (d clamped to +-20)                          verl
``rollout_corr/chi2_seq``           mean over sequences of exp(2 sum_t d) - 1 (sum clamped)      verl
``rollout_corr/ppl_ratio``          mean over sequences of exp(mean_t log pi_infer - mean_t      verl
                                    log pi_train): the trainer's perplexity over the rollout's
``rollout_corr/log_ppl_abs_diff``   mean over sequences of |mean_t log pi_infer - mean_t log     verl
                                    pi_train|
``rollout_corr/rollout_is_eff_      (sum w)^2 / (n sum w^2) of the applied correction weights w  verl
sample_size``                       (1: all weights equal; small: a few tokens dominate)
``rollout_corr/masked_fraction``    tokens whose correction weight is 0 (IcePop band, guards)    verl
``train_rollout_logprob_abs_diff``  mean |d|                                                     slime
``tis_clipfrac``                    tokens with rho > the TIS cap                                slime
``token_mult_prob_error``           mean exp|d|                                                  NeMo-RL
==================================  ===========================================================  ==========

Everything is computed as device tensors and leaves the device in one transfer (``to_host``), so the
metrics cost no per-metric host synchronisation.

Sequence guards (``sequence_keep``): the veto drops a sequence in which any token has ``rho`` below
``veto_threshold`` (verl and slime use 1e-4: a token the trainer finds that much less likely is a sign of a
broken rollout, not of noise); ``seq_max_k2`` drops a sequence whose largest token ``k2 = d^2 / 2`` exceeds
the threshold (verl's ``seq_max_k2``). Both are off at 0; the comparisons are strict, so a value exactly at a
threshold is kept.
"""

from __future__ import annotations

import math

import torch

# logged under these names as they are (slime's and NeMo-RL's), without the trainer's rl/ prefix
FIELD_NAMES = ("train_rollout_logprob_abs_diff", "tis_clipfrac", "token_mult_prob_error")
SAFETY_BOUND = 20.0   # |log ratio| clamp before exponentiating (verl's), so one wild token cannot overflow


def sequence_keep(logp_train: torch.Tensor, logp_infer: torch.Tensor, mask: torch.Tensor, veto_threshold: float,
                  seq_max_k2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keep, vetoed, k2_masked)`` per sequence ``[batch]``: keep is 1.0 for a sequence both guards pass."""
    on = mask > 0
    d = (logp_train - logp_infer).detach()
    vetoed = torch.zeros(d.shape[0], dtype=torch.bool, device=d.device)
    k2_masked = torch.zeros_like(vetoed)
    if veto_threshold > 0:
        vetoed = ((d < math.log(veto_threshold)) & on).any(dim=1)
    if seq_max_k2 > 0:
        k2 = torch.where(on, 0.5 * d.square(), torch.zeros_like(d))
        k2_masked = k2.amax(dim=1) > seq_max_k2
    return (~(vetoed | k2_masked)).to(d.dtype), vetoed, k2_masked


def mismatch_metrics(logp_train: torch.Tensor, logp_infer: torch.Tensor, mask: torch.Tensor,
                     weight: torch.Tensor, tis_cap: float,
                     k3_per_sequence: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The table above, as 0-dim tensors on the inputs' device. ``weight``: the correction weight applied per
    token (after the guards); ``k3_per_sequence``: ``sequence_k3`` of the same inputs, when the caller has it."""
    m = mask.detach().float()
    on = m > 0
    n = m.sum().clamp(min=1)
    per_seq = m.sum(dim=1)
    seqs = (per_seq > 0).float()   # sequences with at least one completion token
    n_seq = seqs.sum().clamp(min=1)
    d = (logp_train - logp_infer).detach().float() * m
    mean_train = (logp_train.detach().float() * m).sum(dim=1) / per_seq.clamp(min=1)
    mean_infer = (logp_infer.detach().float() * m).sum(dim=1) / per_seq.clamp(min=1)
    log_ppl_diff = (mean_infer - mean_train) * seqs
    rho = torch.exp(d.clamp(-SAFETY_BOUND, SAFETY_BOUND))
    w = weight.detach().float() * m
    w_sq = w.square().sum()
    return {
        "rollout_corr/kl": (-d).sum() / n,
        "rollout_corr/k3_kl": (sequence_k3(logp_train, logp_infer, mask) if k3_per_sequence is None
                               else k3_per_sequence).sum() / n,
        "rollout_corr/chi2_token": (rho.square() * m).sum() / n - 1,
        "rollout_corr/chi2_seq": (torch.exp(2 * d.sum(dim=1).clamp(-SAFETY_BOUND, SAFETY_BOUND)) * seqs).sum()
        / n_seq - 1,
        "rollout_corr/ppl_ratio": (torch.exp(log_ppl_diff) * seqs).sum() / n_seq,
        "rollout_corr/log_ppl_abs_diff": log_ppl_diff.abs().sum() / n_seq,
        "rollout_corr/rollout_is_eff_sample_size": torch.where(w_sq > 0, w.sum().square() / (n * w_sq),
                                                               torch.zeros_like(w_sq)),
        "rollout_corr/masked_fraction": ((weight.detach() == 0) & on).sum() / n,
        "train_rollout_logprob_abs_diff": d.abs().sum() / n,
        "tis_clipfrac": ((rho > tis_cap) & on).sum() / n,
        "token_mult_prob_error": (torch.exp(d.abs()) * m).sum() / n,
    }


def sequence_k3(logp_train: torch.Tensor, logp_infer: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence, the sum of its tokens' k3 (rho - 1 - d): summed over the sequences of one precision-map
    version and divided by their tokens, ``rollout_corr/k3_kl`` of that version."""
    m = mask.detach().float()
    d = (logp_train - logp_infer).detach().float() * m
    return ((torch.exp(d.clamp(-SAFETY_BOUND, SAFETY_BOUND)) - 1 - d) * m).sum(dim=1)


def to_host(metrics: dict[str, torch.Tensor]) -> dict[str, float | list[float]]:
    """All metrics in one device->host transfer: 0-dim tensors become floats, vectors lists."""
    flat = [v.detach().float().reshape(-1) for v in metrics.values()]
    values = torch.cat(flat).tolist()
    out, i = {}, 0
    for (key, v), f in zip(metrics.items(), flat):
        out[key] = values[i] if v.dim() == 0 else values[i:i + f.numel()]
        i += f.numel()
    return out
