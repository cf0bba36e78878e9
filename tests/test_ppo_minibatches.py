"""PPO minibatches and epochs (``rl.ppo_minibatches``, ``rl.ppo_epochs``): each trainer batch becomes several
shuffled optimizer steps against one pi_prox, so the decoupled clip has something to clip; every optimizer step
is a runtime step."""

import json

import pytest

from precisionrt.config import ConfigError
from rl_common import events, run

# a learning rate that moves pi_theta past the clip (ratio 1 +- 0.2) within a batch's 8 steps
MINI = ["rl.ppo_minibatches=4", "rl.ppo_epochs=2", "precision.monitor.check_interval=4", "train.log_every=1",
        "train.lr=1e-2"]


def rows(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_minibatch_steps_bind_the_clip_and_are_runtime_steps(tmp_path):
    summary = run(tmp_path, *MINI)
    logged = [r for r in rows(tmp_path) if "rl/minibatch_steps" in r]
    assert [r["rl/minibatch_steps"] for r in logged] == [8] * 6, "4 minibatches x 2 epochs per batch"
    assert max(r["rl/clip_fraction"] for r in logged) > 0, "later steps move pi_theta away from pi_prox"
    assert max(r["rl/ppo_kl"] for r in logged) != 0
    # the runtime counts optimizer steps: 5 warm-start steps, then 6 batches x 8 = 48; checked every 4
    assert [r["step"] for r in events(tmp_path / "run", "stats")] == list(range(4, 5 + 48 + 1, 4))
    s = summary["samples"]
    assert s["trained"] + sum(s["dropped"].values()) + s["in_flight"] == s["generated"]
    assert s["trained"] == 6 * 8, "every sample of every batch trained (none of its steps was skipped)"


@pytest.mark.slow
def test_one_step_per_batch_leaves_the_clip_nothing_to_do(tmp_path):
    """Today's schedule (and the default): pi_theta is pi_prox at the only step, so nothing is clipped."""
    run(tmp_path, "train.log_every=1")
    logged = [r for r in rows(tmp_path) if "rl/clip_fraction" in r]
    assert logged and all(r["rl/clip_fraction"] == 0 and r["rl/minibatch_steps"] == 1 for r in logged)


@pytest.mark.slow
def test_a_resumed_minibatch_run_continues_the_runtime_steps(tmp_path):
    first = run(tmp_path, *MINI, "train.stop_at_step=3")
    resumed = run(tmp_path, *MINI, "train.resume=true")
    assert resumed["resumed_from"] == 3 and resumed["samples"]["trained"] == 6 * 8
    starts = events(tmp_path / "run", "run_start")
    assert [s.get("resumed_from") for s in starts] == [None, 5 + 3 * 8], "resumed at the runtime's own step"
    checks = [r["step"] for r in events(tmp_path / "run", "stats")]
    assert checks == sorted(set(checks)) and checks[-1] == 52, "no check counted twice, none skipped at the end"
    assert first["samples"]["trained"] == 3 * 8


def test_minibatches_must_divide_the_batch(tmp_path):
    with pytest.raises(ConfigError, match="ppo_minibatches \\(3\\) must divide"):
        run(tmp_path, "rl.ppo_minibatches=3")
