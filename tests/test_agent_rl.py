"""Multi-turn agent episodes through the whole RL trainer: accounting, error masking, idle ratios, bad config."""

import json

import pytest

from precisionrt.config import ConfigError

from rl_common import run


AGENT = ['task.name="calculator"', "task.min_digits=1", "task.max_digits=2", "task.heldout_size=8",
         "model.seq_length=96", "env.tool.delay_median=0.01", "env.tool.hang_rate=0.05", "env.tool.timeout=0.2",
         "env.tool.failure_rate=0.2"]


@pytest.mark.parametrize("mode, masking, workers", [("async", True, 2), ("sync", False, 1)])
def test_agent_run_accounts_for_every_episode(tmp_path, mode, masking, workers):
    """Multi-turn calculator episodes, many in flight, through the whole trainer: every episode is trained,
    dropped or in flight at the end; the policy's errors are counted, and their tokens masked only under
    error masking; the idle ratios of trainer, rollout and environment are reported."""
    s = run(tmp_path, *AGENT, f'executor.mode="{mode}"', f"rl.error_masking={str(masking).lower()}",
            f"executor.num_workers={workers}")
    acct, agent = s["samples"], s["agent"]
    assert acct["generated"] == acct["trained"] + sum(acct["dropped"].values()) + acct["in_flight"]
    assert acct["trained"] == 6 * 2 * 4 and agent["episodes"] == acct["generated"]
    assert agent["error_turns"] > 0, "an untrained policy makes malformed calls"
    assert (agent["error_masked_tokens"] > 0) == masking
    assert all(0 <= s[k] <= 1 for k in ("trainer_idle_ratio", "rollout_idle_ratio", "env_idle_ratio"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < sum(r.get("agent/episodes", 0) for r in rows) <= agent["episodes"]   # the rest after the last row
    assert set(s["heldout_final"]) == {"solved", "policy_errors", "recovered"} and 0 <= s["heldout_final"]["solved"] <= 1
    assert [r["eval/solved"] for r in rows if "eval/reward" in r][-1] == s["heldout_final"]["solved"]


def test_agent_context_too_short_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="too short for a calculator episode"):
        run(tmp_path, *AGENT[:-4], "model.seq_length=32")
