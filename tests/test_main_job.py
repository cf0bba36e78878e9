"""`make main` runs the configuration the README and docs/results.md ("Main job") describe: the Makefile's
config, shortened, trains on fixed-width addition with every sample accounted for."""

import re
from pathlib import Path

from precisionrt.config import load_config
from rl.train import RLConfig, train

ROOT = Path(__file__).parent.parent
SHORT = ["train.steps=4", "train.warm_start_steps=3", "train.warm_start_batch=8", "train.log_every=2",
         "train.eval_every=4", "rl.group_size=4", "rl.prompts_per_step=2", "task.heldout_size=8"]


def main_job_config() -> str:
    recipe = re.search(r"^main:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    return re.search(r"--config (\S+)", recipe).group(1)


def test_make_main_runs_the_addition_config_shortened(tmp_path, parallel):
    path = main_job_config()
    assert path == "configs/rl_addition_cpu.toml", "docs/results.md's main job figures are of this config"
    cfg = load_config(RLConfig, ROOT / path, [*SHORT, f'run.dir="{tmp_path / "run"}"'])
    assert (cfg.task.name, cfg.task.min_digits, cfg.task.max_digits) == ("addition", 3, 3)
    s = train(cfg)
    acct = s["samples"]
    assert acct["trained"] == 4 * 8
    assert acct["generated"] == acct["trained"] + sum(acct["dropped"].values()) + acct["in_flight"]
    assert s["max_staleness_trained"] <= cfg.rl.max_staleness
    assert 0 <= s["reward_final"] <= 1 and s["rollout_precision"] == "follow" and s["correction"] == "icepop"
