"""What the RL tests share: a tiny configuration of the quick RL config and a run of it."""

from pathlib import Path

from precisionrt.config import load_config
from rl.train import RLConfig, train

ROOT = Path(__file__).parent.parent
CONFIG = ROOT / "configs/rl_tiny_cpu.toml"
TINY = ["train.steps=6", "train.warm_start_steps=5", "train.warm_start_batch=8", "train.log_every=3",
        "train.eval_every=6", "rl.group_size=4", "rl.prompts_per_step=2", "task.heldout_size=8",
        "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=2"]


def run(tmp_path, *extra) -> dict:
    """``rl.train`` on ``CONFIG`` shortened by ``TINY``, into ``tmp_path / "run"``; returns its summary."""
    return train(load_config(RLConfig, CONFIG, [*TINY, f'run.dir="{tmp_path / "run"}"', *extra]))


def events(run_dir: Path, kind: str) -> list[dict]:
    """The switch-log records of one kind."""
    from precisionrt.observe.events import EVENTS_FILE, read_log
    return [r for r in read_log(run_dir / EVENTS_FILE).records if r["kind"] == kind]


def spy_on_rollouts(monkeypatch, layer: str) -> list[tuple[int, str]]:
    """Records, at every rollout engine ``generate`` call, the engine's precision-map version and ``layer``'s
    precision in it; returns the list the calls append to."""
    from rl.inference.rollout import RolloutEngine

    calls, original = [], RolloutEngine.generate

    def spy(self, *a, **k):
        calls.append((self.map_version, self.precisions()[layer]))
        return original(self, *a, **k)

    monkeypatch.setattr(RolloutEngine, "generate", spy)
    return calls
