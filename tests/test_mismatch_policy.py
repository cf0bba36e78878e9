"""The mismatch policy (``[rl.mismatch_policy]``): a layer that carries the train/inference mismatch is promoted on
the rollout side, or on both, and the promotion travels, is logged and survives a resume."""

import pytest
import torch

from precisionrt.config import ConfigError, load_config
from rl.envs import ReverseDigits
from rl.train import RLConfig
from rl.trainer import RLTrainer

from rl_common import CONFIG, TINY, events, run, spy_on_rollouts


def test_mismatch_policy_promotes_the_culprit_on_the_rollout_side_and_keeps_it_on_resume(tmp_path, monkeypatch):
    """The attribution test's outlier, now acted on: the culprit is promoted on the rollout side only (the FP8
    rollout runs it in BF16 from the next map version on, the trainer's other layers are untouched), the switch
    log says so with the share behind it, and the mismatch of the new map version's samples falls. A run stopped
    after the promotion and resumed keeps the layer in BF16 on the rollout side from its first rollout."""
    layer = "decoder.layers.1.mlp.linear_fc2"
    calls = spy_on_rollouts(monkeypatch, layer)
    sets = ['executor.mode="sync"', "train.steps=24", "rl.attribution_every=1", "rl.attribution_samples=8",
            "precision.monitor.check_interval=2", 'inject.kind="outlier"', f'inject.layer="{layer}"',
            "inject.start_step=5", "inject.factor=1e6", "inject.channels=[0]", "rl.mismatch_policy.promote_share=0.5",
            "rl.mismatch_policy.min_k3_kl=0", "train.checkpoint_every=4"]
    s = run(tmp_path, *sets, "train.stop_at_step=14")
    assert list(s["rollout_promotions"]) == [layer] and s["rollout_promotions"][layer]["scope"] == "rollout"
    promoted_at = s["rollout_promotions"][layer]["step"]
    change = next(c for c in s["rollout_precision_changes"] if c.get("rollout_bf16"))
    assert change["rollout_bf16"] == [layer] and change["step"] == promoted_at
    records = events(tmp_path / "run", "rollout_switch")
    assert [(r["layer"], r["from"], r["to"], r["reason"], r["map_version"]) for r in records] == \
        [(layer, "fp8", "bf16", "mismatch", change["map_version"])]
    assert records[0]["signals"]["mismatch_share"] >= 0.5
    assert all(sw["reason"] != "mismatch" for sw in s["switches"]), "scope rollout: the trainer is not touched"
    before = [p for m, p in calls if m < change["map_version"]]
    after = [p for m, p in calls if m >= change["map_version"]]
    assert set(before) == {"fp8"} and after and set(after) == {"bf16"}
    k3 = s["k3_kl_by_map_version"]
    assert k3[str(change["map_version"])] < 0.2 * k3[str(change["map_version"] - 1)], k3

    calls.clear()
    s = run(tmp_path, *sets, "train.resume=true")
    assert s["resumed_from"] == 14 and list(s["rollout_promotions"]) == [layer]
    assert calls and {p for _, p in calls} == {"bf16"}, "the resumed rollout copy keeps the promotion"
    assert len(events(tmp_path / "run", "rollout_switch")) == 1, "no second record for the same promotion"


@pytest.mark.parametrize("scope", ["rollout", "both"])
def test_mismatch_policy_acts_only_above_share_and_floor(tmp_path, scope, parallel):
    """The policy on crafted measurements, through the real trainer, runtime, switch log and engine: below the
    share or below the k3 floor nothing moves; at them the layer runs BF16 on the rollout side and, under
    "both", on the trainer too (a policy promotion, reason "mismatch", not a hold)."""
    from precisionrt.models.gpt import build_gpt
    from precisionrt.runtime.precision_runtime import PrecisionRuntime
    from rl.algo.attribution import Measurement
    from rl.inference.rollout import RolloutEngine

    cfg = load_config(RLConfig, CONFIG, [
        *TINY, "rl.attribution_every=1", "rl.mismatch_policy.promote_share=0.5", "rl.mismatch_policy.min_k3_kl=1e-3",
        f'rl.mismatch_policy.scope="{scope}"'])
    model = build_gpt(cfg.model)
    runtime = PrecisionRuntime(model, cfg.precision)
    runtime.start_log(tmp_path, {})
    engine = RolloutEngine(cfg.model, cfg.rollout)
    trainer = RLTrainer(model, runtime, torch.optim.AdamW(model.parameters()), engine, ReverseDigits(cfg.task),
                        cfg.rl, "sync", 1, 6, cfg.rollout)
    layer = runtime.names[2]
    for step, (share, k3) in enumerate([(0.49, 0.1), (0.9, 9e-4), (0.5, 1e-3), (0.9, 0.1)], start=1):
        trainer.attribution.last = Measurement(layer, share, k3)
        decided = trainer._act_on_mismatch(step)
        trainer._publish_precisions(step)
        trainer.worker._pull_weights()
        promoted = step >= 3
        assert engine.precisions()[layer] == ("bf16" if promoted else "fp8"), step
        # the mismatch is the forward's: "both" moves the trainer's forward GEMM, and only it
        assert runtime.gemm_precisions()[layer] == {
            "fprop": "bf16" if promoted and scope == "both" else "fp8", "dgrad": "fp8", "wgrad": "fp8"}, step
        assert [e.reason for e in decided] == (["mismatch"] if step == 3 and scope == "both" else []), step
    assert {n for n, p in engine.precisions().items() if p == "bf16"} == {layer}
    assert trainer.map_version == 1 and engine.map_version == 1
    assert [(r["layer"], r["reason"], r["step"]) for r in events(tmp_path, "rollout_switch")] == [(layer, "mismatch", 3)]
    assert [(r["layer"], r["reason"]) for r in events(tmp_path, "switch")] == \
        ([(layer, "mismatch")] if scope == "both" else [])
    assert runtime.policy.layers[f"{layer}:fprop"].hold is None


def test_mismatch_policy_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="attribution_every"):
        run(tmp_path, "rl.mismatch_policy.promote_share=0.5")
    with pytest.raises(ConfigError, match='precision.mode = "dynamic"'):
        run(tmp_path, "rl.attribution_every=1", "rl.mismatch_policy.promote_share=0.5",
            'rl.mismatch_policy.scope="both"', 'precision.mode="fp8"')
    with pytest.raises(ConfigError, match="scope"):
        run(tmp_path, 'rl.mismatch_policy.scope="trainer"')
