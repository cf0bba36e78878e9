"""A CI-sized subset of the fault suite (tools/faults.py): real runs killed with SIGKILL and resumed (an agent
run too), a rollout path that keeps failing, a switch log with damaged lines, an agent's tool that is down.
Each must pass and lose nothing."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
from faults import run_scenarios  # noqa: E402

SUBSET = ["kill_lm_and_resume", "kill_rl_and_resume", "failing_rollouts", "corrupt_log_lines", "resume_lifecycle",
          "hostile_control_file", "tool_outage", "kill_agent_and_resume"]


@pytest.mark.slow
def test_fault_suite_subset(tmp_path):
    results = run_scenarios(SUBSET, tmp_path / "faults", seed=1)
    failed = {k: v["outcome"] for k, v in results.items() if not v["passed"]}
    assert not failed, failed
    assert sum(r["lost"] for r in results.values()) == 0
