"""Mismatch metrics against hand computation on crafted log-probs, and the sequence guards at and around their
thresholds."""

import math

import pytest
import torch

from rl.algo.losses import LossConfig, LossInputs, ppo_loss
from rl.algo.mismatch import mismatch_metrics, sequence_keep, to_host

# two sequences of 3 positions; the second has 2 completion tokens (the last position is padding)
LOGP_INFER = [[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]]
D = [[math.log(2.0), 0.0, math.log(0.25)], [0.1, -0.4, 0.0]]        # log pi_train / pi_infer
MASK = [[1, 1, 1], [1, 1, 0]]


def tensors():
    infer = torch.tensor(LOGP_INFER, dtype=torch.float64)
    train = infer + torch.tensor(D, dtype=torch.float64)
    return train, infer, torch.tensor(MASK, dtype=torch.float64)


def by_hand(tis_cap):
    """The definitions of rl/algo/mismatch.py, token by token in plain Python (no empty row here: the parity tests
    cover it)."""
    toks = [(i, t) for i in range(2) for t in range(3) if MASK[i][t]]
    n = len(toks)
    d = {(i, t): D[i][t] for i, t in toks}
    seq = {i: [d[(j, t)] for j, t in toks if j == i] for i in range(2)}
    train = {(i, t): LOGP_INFER[i][t] + D[i][t] for i, t in toks}
    log_ppl_diff = [sum(LOGP_INFER[i][t] for j, t in toks if j == i) / len(seq[i])
                    - sum(train[(j, t)] for j, t in toks if j == i) / len(seq[i]) for i in range(2)]
    clamped = [min(max(math.exp(x), 1 / tis_cap), tis_cap) for x in d.values()]   # verl's IS weights for the ESS
    mean_w = sum(clamped) / n
    row_mean = lambda f: sum(sum(f(x) for x in s) / len(s) for s in seq.values()) / 2   # noqa: E731 - slime's
    return {
        "rollout_corr/kl": sum(-x for x in d.values()) / n,
        "rollout_corr/k3_kl": sum(math.exp(x) - 1 - x for x in d.values()) / n,
        "rollout_corr/chi2_token": sum(math.exp(2 * x) for x in d.values()) / n - 1,
        "rollout_corr/chi2_seq": sum(math.exp(2 * sum(s)) for s in seq.values()) / 2 - 1,
        "rollout_corr/ppl_ratio": sum(math.exp(x) for x in log_ppl_diff) / 2,
        "rollout_corr/log_ppl_abs_diff": sum(abs(x) for x in log_ppl_diff) / 2,
        "rollout_corr/rollout_is_eff_sample_size": 1 / (sum((w / mean_w) ** 2 for w in clamped) / n),
        "train_rollout_logprob_abs_diff": row_mean(abs),
        "tis_clipfrac": row_mean(lambda x: math.exp(x) > tis_cap),
        "token_mult_prob_error": sum(math.exp(abs(x)) for x in d.values()) / n,
    }


def test_each_metric_matches_its_hand_computed_definition():
    train, infer, mask = tensors()
    got = to_host(mismatch_metrics(train, infer, mask, tis_cap=1.5))
    want = by_hand(tis_cap=1.5)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_identical_policies_give_the_neutral_values():
    _, infer, mask = tensors()
    got = to_host(mismatch_metrics(infer, infer, mask, tis_cap=2.0, icepop_band=(0.5, 2.0), band_kept=mask))
    assert got["rollout_corr/kl"] == 0 and got["rollout_corr/chi2_token"] == 0 and got["rollout_corr/chi2_seq"] == 0
    assert got["rollout_corr/ppl_ratio"] == 1 and got["token_mult_prob_error"] == 1 and got["tis_clipfrac"] == 0
    assert got["rollout_corr/rollout_is_eff_sample_size"] == pytest.approx(1, abs=1e-7)
    assert got["rollout_corr/rollout_rs_masked_fraction"] == 0


@pytest.mark.parametrize("ratio, vetoed", [(1e-4 * 0.999, True), (1e-4, False), (1e-4 * 1.001, False)])
def test_veto_drops_a_sequence_whose_token_ratio_falls_below_the_floor(ratio, vetoed):
    infer = torch.zeros(2, 3, dtype=torch.float64)
    train = infer.clone()
    train[0, 1] = math.log(ratio)
    train[1, 2] = math.log(1e-9)                     # far below, but on a padding position: ignored
    mask = torch.tensor(MASK, dtype=torch.float64)
    keep, v, k2 = sequence_keep(train, infer, mask, veto_threshold=1e-4, seq_max_k2=0.0)
    assert v.tolist() == [vetoed, False] and keep.tolist() == [float(not vetoed), 1.0] and not k2.any()


@pytest.mark.parametrize("scale, masked", [(0.999, False), (1.0, False), (1.001, True)])
def test_seq_max_k2_drops_a_sequence_over_the_threshold(scale, masked):
    threshold = 0.5
    d = math.sqrt(2 * threshold) * scale              # k2 = d^2 / 2 = threshold * scale^2
    infer = torch.zeros(2, 3, dtype=torch.float64)
    train = infer.clone()
    train[1, 0] = -d
    keep, v, k2 = sequence_keep(train, infer, torch.tensor(MASK, dtype=torch.float64), 0.0, threshold)
    assert k2.tolist() == [False, masked] and keep.tolist() == [1.0, float(not masked)] and not v.any()


def test_guarded_sequences_give_no_gradient_and_are_counted():
    train, infer, mask = tensors()
    logp = train.clone().requires_grad_(True)
    inputs = LossInputs(logp=logp, logp_prox=train, logp_infer=infer, advantages=torch.ones(2, dtype=torch.float64),
                        mask=mask)
    # sequence 0 holds a ratio of 0.25: a veto floor of 0.3 drops it; correction none keeps the rest at weight 1
    loss, m = ppo_loss(inputs, LossConfig(correction="none", veto_threshold=0.3))
    loss.backward()
    assert logp.grad[0].abs().sum() == 0 and logp.grad[1, :2].abs().min() > 0
    assert m["veto_fraction"] == 0.5 and m["masked_fraction"] == pytest.approx(3 / 5)
    assert m["seq_max_k2_fraction"] == 0
    with pytest.raises(ValueError, match=r"veto_threshold: must be in \[0, 1\)"):
        LossConfig(veto_threshold=1.0)


def test_per_sequence_k3_and_vectors_in_the_one_transfer():
    """The split by precision-map version sums per-sequence k3 over a version's sequences; the vector leaves the
    device in the same transfer as the scalars."""
    from rl.algo.mismatch import sequence_k3

    train, infer, mask = tensors()
    got = to_host({"a": torch.tensor(2.0), "k3": sequence_k3(train, infer, mask), "b": torch.tensor(3.0)})
    want = [sum(math.exp(D[i][t]) - 1 - D[i][t] for t in range(3) if MASK[i][t]) for i in range(2)]
    assert got["a"] == 2.0 and got["b"] == 3.0 and got["k3"] == pytest.approx(want, rel=1e-6)
