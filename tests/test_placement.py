"""Where the rollout engine runs (issue 24, item 4): ``rollout.placement``.

``colocated``: on the trainer's device, in its process, with a policy copy that shares no tensor with the trainer
(a trainer update reaches it only by weight sync). ``split``: elsewhere; on a CPU machine that is a Ray actor, a
process of its own. Placements that cannot be honoured are refused by name before anything is built.
"""

from __future__ import annotations

import os

import pytest
import torch

from precisionrt.config import ConfigError
from rl.trainer import RLTrainer
from rl_common import run


def _storages(module_or_state) -> set[int]:
    tensors = module_or_state.values() if isinstance(module_or_state, dict) else \
        [*module_or_state.parameters(), *module_or_state.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def test_a_colocated_rollout_copy_shares_nothing_mutable_with_the_trainer(tmp_path, monkeypatch):
    seen = {}
    original = RLTrainer.train_step

    def inspect(self, step, grad_clip):
        if not seen:   # the first RL step: trainer, engine and channel side by side
            engine = self.worker.engine
            trainer_storage = _storages(self.model)
            with self.worker.channel.acquire() as slot:
                slot_storage = {b.untyped_storage().data_ptr() for b in slot.state.buffers}
            seen["engine_device"] = engine.device
            seen["shared_with_trainer"] = _storages(engine.model) & trainer_storage
            seen["shared_with_channel"] = (_storages(engine.model) | trainer_storage) & slot_storage
            before = {k: v.clone() for k, v in engine.model.state_dict().items() if isinstance(v, torch.Tensor)}
            out = original(self, step, grad_clip)   # an optimizer step on the trainer
            after = engine.model.state_dict()
            seen["changed_by_trainer_step"] = [k for k, v in before.items() if not torch.equal(v, after[k])]
            return out
        return original(self, step, grad_clip)

    monkeypatch.setattr(RLTrainer, "train_step", inspect)
    s = run(tmp_path, 'executor.mode="sync"', "train.steps=3", 'rollout.placement="colocated"')
    assert s["steps"] == 3 and seen["engine_device"] == torch.device("cpu")
    assert seen["shared_with_trainer"] == set() and seen["shared_with_channel"] == set()
    assert seen["changed_by_trainer_step"] == [], "the engine changes only when it loads a publication"


def test_a_split_rollout_runs_in_a_process_of_its_own(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from rl.inference.executors import RayRolloutEngine

    pids = []
    original = RayRolloutEngine.generate

    def record(self, *a, **k):
        pids.append(self.pid())
        return original(self, *a, **k)

    monkeypatch.setattr(RayRolloutEngine, "generate", record)
    s = run(tmp_path, 'rollout.placement="split"', 'executor.kind="ray"', "train.steps=4")
    acct = s["samples"]
    assert s["steps"] == 4 and acct["trained"] == 32
    assert pids and os.getpid() not in pids and len(set(pids)) == 1
    assert acct["generated"] == acct["trained"] + sum(acct["dropped"].values()) + acct["in_flight"]


@pytest.mark.parametrize("overrides, message", [
    (['rollout.placement="split"'], 'placement = "split" in the trainer\'s process needs rollout.device'),
    (['rollout.placement="split"', 'rollout.device="cpu"'], "another device than the trainer's"),
    (['rollout.device="cuda:1"'], "torch sees 0 CUDA device"),
    (['rollout.device="tpu:3"'], "rollout.device"),
    (['executor.kind="ray"', 'rollout.device="cpu"'], "a Ray actor runs on its own device"),
    (["executor.num_gpus=1"], "executor.num_gpus is what a Ray actor asks for"),
    (["executor.num_gpus=-2"], "executor.num_gpus"),
])
def test_placements_that_cannot_be_honoured_are_refused_by_name(tmp_path, overrides, message):
    if torch.cuda.is_available():
        pytest.skip("the refusals are written for a machine without CUDA")
    with pytest.raises((ConfigError, ValueError), match=message):
        run(tmp_path, *overrides)
    assert not (tmp_path / "run").exists(), "refused before anything was written"


def test_a_resume_on_another_device_reseeds_the_sampler_and_says_so(tmp_path, caplog):
    """A generator's state is device-specific (a CPU state does not load into a CUDA generator): a checkpoint whose
    sampler ran on another device continues from a seed its saved state decides, with a warning. Simulated
    here by marking the CPU checkpoint as saved on CUDA."""
    run(tmp_path, "train.stop_at_step=3", 'executor.mode="sync"')
    from precisionrt.run.checkpoint import save_checkpoint

    path = next((tmp_path / "run" / "checkpoints").glob("step_*3.pt"))
    state = torch.load(path, weights_only=True)
    assert state["rl"]["trainer"]["gen_device"] == "cpu"
    state["rl"]["trainer"]["gen_device"] = "cuda"
    save_checkpoint(tmp_path / "run", 3, state)   # with its checksum, as the run wrote it
    with caplog.at_level("WARNING", logger="rl.workers.worker"):
        resumed = run(tmp_path, "train.resume=true", 'executor.mode="sync"')
    assert resumed["steps"] == 6 and resumed["resumed_from"] == 3
    assert any("saved on cuda and runs on cpu now: reseeded" in r.getMessage() for r in caplog.records)
