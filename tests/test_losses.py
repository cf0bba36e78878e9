"""IcePop, TIS and the PPO surrogate on hand-computed ratios (contract C8)."""

import math

import pytest
import torch

from rl.algo.losses import LossConfig, LossInputs, flat_groups, grpo_advantages, icepop_weights, ppo_loss, tis_weights

# train/infer ratios: below the band, at its low end, inside, at its high end, above it
RATIOS = [0.4, 0.5, 1.3, 2.0, 2.5]


def logps(ratios):
    infer = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0], dtype=torch.float64)
    train = infer + torch.log(torch.tensor(ratios, dtype=torch.float64))
    return train, infer


def test_icepop_weights_inside_at_and_outside_the_band():
    train, infer = logps(RATIOS)
    w = icepop_weights(train, infer, 0.5, 2.0)
    assert w.tolist() == pytest.approx([0.0, 0.5, 1.3, 2.0, 0.0], abs=1e-12)
    assert not w.requires_grad


def test_icepop_gives_no_gradient_outside_the_band():
    train, infer = logps(RATIOS)
    logp = train.clone().requires_grad_(True)
    inp = LossInputs(logp=logp[None], logp_prox=train[None], logp_infer=infer[None],
                     advantages=torch.ones(1, dtype=torch.float64), mask=torch.ones(1, 5, dtype=torch.float64))
    loss, metrics = ppo_loss(inp, LossConfig(correction="icepop"))
    loss.backward()
    assert logp.grad[0] == 0 and logp.grad[4] == 0, "outside the band: exactly no gradient"
    assert (logp.grad[1:4] != 0).all()
    assert metrics["masked_fraction"] == pytest.approx(2 / 5)
    assert metrics["ratio_min"] == pytest.approx(0.4) and metrics["ratio_max"] == pytest.approx(2.5)
    # a batch entirely outside the band contributes nothing at all
    out_train, out_infer = logps([0.1, 0.2, 3.0, 4.0, 9.0])
    logp2 = out_train.clone().requires_grad_(True)
    loss2, _ = ppo_loss(LossInputs(logp=logp2[None], logp_prox=out_train[None], logp_infer=out_infer[None],
                                   advantages=torch.ones(1, dtype=torch.float64),
                                   mask=torch.ones(1, 5, dtype=torch.float64)), LossConfig())
    loss2.backward()
    assert loss2.item() == 0 and torch.all(logp2.grad == 0)


@pytest.mark.parametrize("correction, expected", [
    ("tis", [0.4, 0.5, 1.3, 2.0, 2.0]), ("none", [1.0] * 5), ("icepop", [0.0, 0.5, 1.3, 2.0, 0.0])])
def test_correction_weights_scale_the_gradient(correction, expected):
    train, infer = logps(RATIOS)
    logp = train.clone().requires_grad_(True)    # pi_theta == pi_prox: PPO ratio exactly 1
    inp = LossInputs(logp=logp[None], logp_prox=train[None], logp_infer=infer[None],
                     advantages=torch.full((1,), 2.0, dtype=torch.float64), mask=torch.ones(1, 5, dtype=torch.float64))
    loss, _ = ppo_loss(inp, LossConfig(correction=correction))
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-2.0 * w / 5 for w in expected], abs=1e-12)
    if correction == "tis":
        assert tis_weights(train, infer, 2.0).tolist() == pytest.approx(expected)


def test_identical_policies_give_unit_ratios_and_zero_mismatch():
    logp = torch.log(torch.rand(3, 7, dtype=torch.float64))
    inp = LossInputs(logp=logp.clone().requires_grad_(True), logp_prox=logp, logp_infer=logp.clone(),
                     advantages=torch.randn(3, dtype=torch.float64), mask=torch.ones(3, 7, dtype=torch.float64))
    _, m = ppo_loss(inp, LossConfig())
    assert m["ratio_min"] == m["ratio_max"] == 1.0 and m["masked_fraction"] == 0
    assert m["rollout_corr/kl"] == 0 and m["rollout_corr/k3_kl"] == 0 and m["train_rollout_logprob_abs_diff"] == 0


def test_mask_excludes_prompt_and_padding():
    logp = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    inp = LossInputs(logp=logp, logp_prox=torch.zeros(1, 4, dtype=torch.float64),
                     logp_infer=torch.tensor([[0.0, math.log(10), 0.0, 0.0]], dtype=torch.float64),
                     advantages=torch.ones(1, dtype=torch.float64), mask=torch.tensor([[0.0, 0.0, 1.0, 1.0]],
                                                                                       dtype=torch.float64))
    loss, m = ppo_loss(inp, LossConfig())
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([0, 0, -0.5, -0.5]) and m["masked_fraction"] == 0


def test_sequence_level_weight_uses_the_geometric_mean():
    train, infer = logps([0.4, 0.5, 1.3, 2.0, 2.5])
    inp = LossInputs(logp=train[None].clone().requires_grad_(True), logp_prox=train[None], logp_infer=infer[None],
                     advantages=torch.ones(1, dtype=torch.float64), mask=torch.ones(1, 5, dtype=torch.float64))
    geo = math.prod([0.4, 0.5, 1.3, 2.0, 2.5]) ** (1 / 5)
    loss, _ = ppo_loss(inp, LossConfig(level="sequence"))
    assert loss.item() == pytest.approx(-geo)


def test_grpo_advantages_are_group_normalised():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    adv = grpo_advantages(rewards, group_size=4)   # the sample std: sqrt(4 * 0.25 / 3)
    assert adv[:4].tolist() == pytest.approx([x * math.sqrt(3 / 4) for x in (1, -1, 1, -1)], abs=1e-5)
    assert grpo_advantages(rewards, 4, std="population")[:4].tolist() == pytest.approx([1, -1, 1, -1], abs=1e-5)
    assert grpo_advantages(rewards, 4, std="none")[:4].tolist() == pytest.approx([0.5, -0.5, 0.5, -0.5])
    assert adv[4:].tolist() == [0, 0, 0, 0], "a group with equal rewards teaches nothing"
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(torch.zeros(8), 3)


@pytest.mark.parametrize("credit", [0.6, 0.8, 2 / 3, 1e-3, 7.0])
def test_grpo_advantages_of_equal_rewards_are_exactly_zero(credit):
    rewards = torch.tensor([credit] * 8 + [0.0, 1.0] * 4)
    adv = grpo_advantages(rewards, group_size=8)
    assert adv[:8].tolist() == [0.0] * 8, "rounding in the mean must not become an advantage"
    assert adv[8:].abs().tolist() == pytest.approx([math.sqrt(7 / 8)] * 8, abs=1e-5)   # 0.5 / sample std
    assert flat_groups(rewards, 8).tolist() == [True, False]


@pytest.mark.parametrize("band", [(2.0, 0.5), (1.0, 1.0), (0.0, 2.0)])
def test_invalid_band_is_refused(band):
    with pytest.raises(ValueError, match=r"icepop_band(\[0\]: must be in \(0|.* low < high)"):
        LossConfig(icepop_band=band)
    with pytest.raises(ValueError, match="0 < low < high"):
        icepop_weights(torch.zeros(1), torch.zeros(1), *band)


def test_naive_ppo_clips_on_the_behaviour_policy():
    """AReaL's naive-PPO baseline: the ratio is pi_theta / pi_infer. With a positive advantage, tokens whose
    ratio is above 1 + eps are clipped (no gradient) and those below 1 - eps keep the ratio's gradient: stale
    samples lose most of their signal. The decoupled objective on the same tokens clips nothing (pi_theta ==
    pi_prox) and the correction decides instead."""
    train, infer = logps(RATIOS)
    grads = {}
    for objective in ("naive", "decoupled"):
        logp = train.clone().requires_grad_(True)
        inp = LossInputs(logp=logp[None], logp_prox=train[None], logp_infer=infer[None],
                         advantages=torch.full((1,), 2.0, dtype=torch.float64),
                         mask=torch.ones(1, 5, dtype=torch.float64))
        loss, m = ppo_loss(inp, LossConfig(correction="none", objective=objective))
        loss.backward()
        grads[objective] = logp.grad.tolist()
    assert grads["naive"] == pytest.approx([-2.0 * r / 5 for r in [0.4, 0.5, 0, 0, 0]], abs=1e-12)
    assert grads["decoupled"] == pytest.approx([-2.0 / 5] * 5, abs=1e-12)
    with pytest.raises(ValueError, match='correction = "none"'):
        LossConfig(objective="naive", correction="icepop")
