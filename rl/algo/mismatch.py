"""Train/inference mismatch: the metrics the field reports, each under a peer's name computing that peer's
definition, and the sequence-level guards beside IcePop.

Per token, with ``rho = pi_train / pi_infer`` (``pi_train``: the trainer's policy before the update, pi_prox;
``pi_infer``: the rollout engine's, which sampled the token), ``d = log rho`` and ``m`` the mask of completion
tokens. ``mean_tok`` is the mean over the batch's masked tokens; ``mean_rows`` the mean over *every* row of the
batch, an all-masked row included (its per-row values are those of an empty sum: ``sum d = 0``, a per-row mean
of 0); ``sample_mean`` is slime's reduction, the mean over every row of the row's own token mean.

=====================================  ==================================================  ====================
name                                   definition                                          source (repo: path)
=====================================  ==================================================  ====================
``rollout_corr/kl``                    mean_tok(-d): KL(pi_infer || pi_train), k1          verl [1]
``rollout_corr/k3_kl``                 mean_tok(rho - 1 - d), unclamped                    verl [1]
``rollout_corr/chi2_token``            mean_tok(exp(clamp(d, +-20))^2) - 1                 verl [1]
``rollout_corr/chi2_seq``              mean_rows(exp(2 clamp(sum_t d, +-20))) - 1          verl [1]
``rollout_corr/ppl_ratio``             mean_rows(exp(l)), l = row mean of log pi_infer     verl [1]
                                       minus row mean of log pi_train
``rollout_corr/log_ppl_abs_diff``      mean_rows(abs(l))                                   verl [1]
``rollout_corr/rollout_is_eff_sample_  1 / mean_tok((w / mean_tok(w))^2) of the token IS   verl [1]
size``                                 weights w = exp(clamp(d)) clamped to [1/C, C],
                                       C = ``rl.loss.tis_cap`` (verl's rollout_is_threshold)
``rollout_corr/rollout_rs_masked_      mean_tok(token outside the IcePop band), at the     verl [1]
fraction``                             correction's level (IcePop runs only)
``train_rollout_logprob_abs_diff``     sample_mean(abs(d))                                 slime [2]
``tis_clipfrac``                       sample_mean(rho outside [low, high]) under IcePop   slime [2]
                                       (its icepop_function); else sample_mean(rho > C)
                                       (vanilla_tis_function, tis_clip_low 0)
``token_mult_prob_error``              mean_tok(exp(abs(d)))                               NeMo-RL [3]
=====================================  ==================================================  ====================

[1] volcengine/verl: verl/trainer/ppo/rollout_corr_helper.py (compute_offpolicy_metrics, compute_is_metrics,
    compute_rollout_rejection_mask). [2] THUDM/slime: slime/backends/megatron_utils/loss.py with
    get_sum_of_sample_mean from cp_utils.py. [3] NVIDIA/NeMo-RL: nemo_rl/algorithms/loss_functions.py.
``tests/test_metric_parity.py`` re-writes each from its source and compares on ragged, padded float64 batches
with an all-masked row and heavy-tailed gaps (<= 1e-6).

Intended differences, under our own names (``rl/`` in the logs): ``rl/masked_fraction`` (tokens given no
gradient by the correction or the guards), ``rl/applied_weight_ess`` (the ESS of the weights actually
applied, IcePop's zeros included), ``rl/veto_fraction`` and ``rl/seq_max_k2_fraction`` (of the sequences that
have completion tokens; verl at HEAD has no veto). An empty batch (no completion token at all) gives 0
where verl raises. The IcePop band keeps ratios within 1e-6 (relative) of its edges, so that a ratio at an
edge up to float rounding counts as inside; the peers compare exactly.

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


def _float(t: torch.Tensor) -> torch.Tensor:
    """Detached, in at least float32 (float64 stays float64: the parity tests compare at 1e-6)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


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


def sample_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """slime's reduction: each row's mean over its own tokens (an empty row: 0), then the mean over all rows."""
    return ((x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()


def mismatch_metrics(logp_train: torch.Tensor, logp_infer: torch.Tensor, mask: torch.Tensor, *, tis_cap: float,
                     icepop_band: tuple[float, float] | None = None, band_kept: torch.Tensor | None = None,
                     k3_per_sequence: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The table above, as 0-dim tensors on the inputs' device. ``icepop_band``: the run corrects with IcePop
    (slime's ``tis_clipfrac`` then counts both ends of the band); ``band_kept``: 1 where the IcePop band kept the
    token, at the correction's level (gives verl's ``rollout_rs_masked_fraction``); ``k3_per_sequence``:
    ``sequence_k3`` of the same inputs, when the caller has it."""
    m = _float(mask)
    n = m.sum().clamp(min=1)
    per_row = m.sum(dim=1)
    d = (_float(logp_train) - _float(logp_infer)) * m
    row_mean = lambda x: (x * m).sum(dim=1) / per_row.clamp(min=1)   # noqa: E731 - an empty row: 0
    log_ppl_diff = row_mean(_float(logp_infer)) - row_mean(_float(logp_train))
    rho_safe = torch.exp(d.clamp(-SAFETY_BOUND, SAFETY_BOUND))
    rho = torch.exp(d)
    on = m > 0
    is_w = rho_safe.clamp(1 / tis_cap, tis_cap)
    is_norm = is_w / ((is_w * m).sum() / n + 1e-8)
    if icepop_band is not None:
        clipped = (rho < icepop_band[0]) | (rho > icepop_band[1])
    else:
        clipped = rho > tis_cap
    out = {
        "rollout_corr/kl": (-d).sum() / n,
        "rollout_corr/k3_kl": (sequence_k3(logp_train, logp_infer, mask) if k3_per_sequence is None
                               else k3_per_sequence).sum() / n,
        "rollout_corr/chi2_token": (rho_safe.square() * m).sum() / n - 1,
        "rollout_corr/chi2_seq": torch.exp(2 * d.sum(dim=1).clamp(-SAFETY_BOUND, SAFETY_BOUND)).mean() - 1,
        "rollout_corr/ppl_ratio": torch.exp(log_ppl_diff).mean(),
        "rollout_corr/log_ppl_abs_diff": log_ppl_diff.abs().mean(),
        "rollout_corr/rollout_is_eff_sample_size": n / (is_norm.square() * m).sum().clamp(min=1e-30),
        "train_rollout_logprob_abs_diff": sample_mean(d.abs(), m),
        "tis_clipfrac": sample_mean((clipped & on).to(m.dtype), m),
        "token_mult_prob_error": (torch.exp(d.abs()) * m).sum() / n,
    }
    if band_kept is not None:
        out["rollout_corr/rollout_rs_masked_fraction"] = ((1 - _float(band_kept)) * m).sum() / n
    return out


def sequence_k3(logp_train: torch.Tensor, logp_infer: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence, the sum of its tokens' k3 (rho - 1 - d, unclamped as verl's): summed over the sequences of
    one precision-map version and divided by their tokens, ``rollout_corr/k3_kl`` of that version."""
    m = _float(mask)
    d = (_float(logp_train) - _float(logp_infer)) * m
    return ((torch.exp(d) - 1 - d) * m).sum(dim=1)


def flatten(metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """The metrics as one float64 vector on their device, in order (``unflatten`` reads it back)."""
    return torch.cat([v.detach().double().reshape(-1) for v in metrics.values()])


def unflatten(metrics: dict[str, torch.Tensor], values: list[float]) -> dict[str, float | list[float]]:
    """``values`` (a ``flatten`` of ``metrics`` on the host) by name: 0-dim tensors as floats, vectors as lists."""
    out, i = {}, 0
    for key, v in metrics.items():
        out[key] = values[i] if v.dim() == 0 else values[i:i + v.numel()]
        i += v.numel()
    return out


def to_host(metrics: dict[str, torch.Tensor]) -> dict[str, float | list[float]]:
    """All metrics in one device->host transfer: 0-dim tensors become floats, vectors lists."""
    return unflatten(metrics, flatten(metrics).tolist())
