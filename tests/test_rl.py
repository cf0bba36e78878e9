"""The asynchronous RL trainer end to end on a tiny policy: accounting, staleness, IcePop metrics, bad input."""

import json
import math
import re
import random

import pytest
import torch

from precisionrt.config import ConfigError
from rl.envs import ReverseDigits, TaskConfig
from rl.inference.rollout import generate
from rl.algo.staleness import StalenessConfig, StalenessController
from rl.trainer import RLTrainer

from rl_common import run, spy_on_rollouts


@pytest.fixture(autouse=True)
def _root(monkeypatch, parallel):
    from pathlib import Path
    monkeypatch.chdir(Path(__file__).parent.parent)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_run_accounts_for_every_sample(tmp_path, mode):
    s = run(tmp_path, f'executor.mode="{mode}"')
    acct = s["samples"]
    assert acct["generated"] == acct["trained"] + sum(acct["dropped"].values()) + acct["in_flight"]
    assert acct["trained"] == 6 * 8
    assert s["max_staleness_trained"] <= 2 and all(int(k) <= 2 for k in s["staleness_histogram"])
    if mode == "sync":
        assert s["staleness_histogram"] == {"0": 48} and acct["in_flight"] == 0
    for key in ("steps", "wall_s", "reward_initial", "reward_final", "samples", "icepop_masked_fraction",
                "samples_per_s", "fp8_flop_fraction", "switches"):
        assert key in s, key
    for f in ("config.json", "metrics.jsonl", "summary.json", "precision_events.jsonl"):
        assert (tmp_path / "run" / f).is_file()


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_identical_precisions_on_policy_give_unit_ratios(tmp_path, monkeypatch, top_p):
    """Same weights, same precision, no staleness: every token's ratio is 1, also when sampling is truncated
    to a top-p nucleus (the behaviour log-prob is scored under the full softmax, as the trainer scores it)."""
    seen = []
    original = RLTrainer.train_step

    def spy(self, *a, **k):
        m = original(self, *a, **k)
        seen.append(m)
        return m
    monkeypatch.setattr(RLTrainer, "train_step", spy)
    run(tmp_path, 'precision.mode="bf16"', 'rollout.precision="bf16"', "rl.max_staleness=0",
        'executor.mode="sync"', f"rollout.top_p={top_p}")
    for m in seen:
        assert m["ratio_min"] == pytest.approx(1, abs=1e-4) and m["ratio_max"] == pytest.approx(1, abs=1e-4)
        assert m["masked_fraction"] == 0 and abs(m["rollout_corr/k3_kl"]) < 1e-8


def test_fp8_rollout_creates_a_measured_mismatch(tmp_path, monkeypatch):
    seen = []
    original = RLTrainer.train_step
    monkeypatch.setattr(RLTrainer, "train_step", lambda self, *a, **k: seen.append(original(self, *a, **k))
                        or seen[-1])
    run(tmp_path, 'precision.mode="bf16"', 'rollout.precision="fp8"', "rl.max_staleness=0", 'executor.mode="sync"')
    assert all(m["rollout_corr/k3_kl"] > 0 and m["train_rollout_logprob_abs_diff"] > 1e-4 for m in seen)
    assert all(0 <= m["masked_fraction"] <= 1 for m in seen)


def test_admission_control_bounds_what_can_be_in_flight():
    ctrl = StalenessController(StalenessConfig(max_staleness=1), batch_size=4)
    assert ctrl.try_admit(4) and ctrl.try_admit(4)
    assert not ctrl.try_admit(1), "(eta + version + 1) * batch = 8 admitted: a slow trainer stops the worker"
    ctrl.returned(8)
    ctrl.created(8)
    ctrl.trained([0] * 4)
    ctrl.advance()
    assert ctrl.try_admit(4) and not ctrl.try_admit(4)
    ctrl.returned(4)
    ctrl.created(4)
    ctrl.advance(), ctrl.advance()
    assert ctrl.version == 3 and ctrl.is_stale(1) and not ctrl.is_stale(2)
    ctrl.drop(4, "stale")
    ctrl.check(present=4)
    with pytest.raises(RuntimeError, match="1 unaccounted"):
        ctrl.check(present=3)   # one sample lost: the balance breaks
    assert ctrl.acct.as_dict() == {"generated": 12, "trained": 4, "dropped": {"stale": 4}, "in_flight": 4,
                                   "failed_rollouts": 0, "worker_lost": 0}
    assert ctrl.try_admit(4), "a dropped sample frees its admission slot"


class BrokenRewards(ReverseDigits):
    def reward(self, problem, completion):
        return math.nan if problem.prompt[0] in b"01234" else super().reward(problem, completion)


def test_malformed_rewards_are_counted_drops(tmp_path, monkeypatch):
    monkeypatch.setattr("rl.workload.make_task", BrokenRewards)
    s = run(tmp_path, 'executor.mode="sync"', "train.warm_start_steps=0")
    acct = s["samples"]
    assert acct["dropped"].get("bad_reward", 0) > 0 and acct["trained"] == 48
    assert acct["generated"] == acct["trained"] + sum(acct["dropped"].values()) + acct["in_flight"]


def test_prompt_longer_than_context_and_bad_band_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="seq_length 8 is shorter"):
        run(tmp_path, "model.seq_length=8")
    with pytest.raises(ConfigError, match=r"rl.loss: icepop_band must be \[low, high\] with low < high"):
        run(tmp_path, "rl.loss.icepop_band=[2.0, 0.5]")
    with pytest.raises(ValueError, match="must fit the context"):
        generate(torch.nn.Identity(), [b"1" * 20], 4, 16, 1.0, 1.0, torch.Generator())


def test_reward_has_partial_credit():
    task = ReverseDigits(TaskConfig(heldout_size=4))
    p = task.sample(random.Random(0))
    assert task.reward(p, p.target) == 1.0
    assert task.reward(p, b"") == 0.0
    assert task.reward(p, p.target + b"99") == pytest.approx(len(p.target) / (len(p.target) + 2))
    assert p not in task.heldout()


def test_slow_trainer_keeps_the_queue_bounded(tmp_path, monkeypatch):
    import time

    queue_sizes = []
    original = RLTrainer.next_batch

    def slow(self, *a, **k):
        time.sleep(0.3)     # a trainer much slower than the rollout worker
        queue_sizes.append(self.queue.qsize())
        return original(self, *a, **k)
    monkeypatch.setattr(RLTrainer, "next_batch", slow)
    s = run(tmp_path, 'executor.mode="async"', "rl.max_staleness=1")
    groups_per_batch = 2
    # admission: at most (eta + version + 1) batches ever admitted, so at most (eta + 1) batches wait
    assert max(queue_sizes) <= (1 + 1) * groups_per_batch
    assert max(queue_sizes) > 0, "the worker did run ahead of the slow trainer"
    assert s["samples"]["in_flight"] <= (1 + 1) * 8 and s["max_staleness_trained"] <= 1


def test_resume_continues_and_keeps_the_accounting_whole(tmp_path):
    first = run(tmp_path, "train.stop_at_step=3")
    assert first["steps"] == 3
    resumed = run(tmp_path, "train.resume=true")
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 6
    acct = resumed["samples"]
    assert acct["trained"] == 6 * 8, "both segments' trained samples are counted"
    lost = first["samples"]["in_flight"]
    assert acct["dropped"].get("lost_on_restart", 0) == lost
    assert acct["generated"] == acct["trained"] + sum(acct["dropped"].values()) + acct["in_flight"]
    assert resumed["reward_initial"] == first["reward_initial"]
    from precisionrt.observe.events import read_log
    starts = [r for r in read_log(tmp_path / "run" / "precision_events.jsonl").records if r["kind"] == "run_start"]
    assert [s.get("resumed_from") for s in starts] == [None, 5 + 3]
    # resuming the finished run changes nothing (it used to rewrite summary.json with wrong figures)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    again = run(tmp_path, "train.resume=true")
    assert again == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_executor_generates_in_actors(tmp_path, monkeypatch, workers):
    pytest.importorskip("ray")
    from rl.inference.executors import RayRolloutEngine

    calls = []
    original = RayRolloutEngine.generate
    monkeypatch.setattr(RayRolloutEngine, "generate", lambda self, *a: calls.append(id(self)) or original(self, *a))
    s = run(tmp_path, 'executor.kind="ray"', f"executor.num_workers={workers}")
    acct = s["samples"]
    assert acct["trained"] == 48 and len(calls) >= 6 and s["executor"]["kind"] == "ray"
    assert len(set(calls)) == workers, "every actor generates"
    assert acct["generated"] == acct["trained"] + sum(acct["dropped"].values()) + acct["in_flight"]
    import ray
    assert not ray.is_initialized(), "the run shuts its local cluster down"


def test_entropy_is_logged_and_its_bonus_changes_the_update(tmp_path, monkeypatch):
    import json

    s0 = run(tmp_path / "a", 'executor.mode="sync"')
    s1 = run(tmp_path / "b", 'executor.mode="sync"', "rl.entropy_coef=1.0")
    rows = [json.loads(l) for l in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    ent = [r["rl/entropy"] for r in rows if "rl/entropy" in r]
    assert ent and all(0 < e <= math.log(256) + 1e-6 for e in ent)
    w0, w1 = (torch.load(tmp_path / d / "run" / "checkpoints" / "step_000006.pt", weights_only=True)["model"]
              for d in ("a", "b"))
    assert s0["steps"] == s1["steps"] == 6
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if isinstance(w0[k], torch.Tensor)), \
        "same data and seeds: only the entropy bonus can make the weights differ"


def test_a_skipped_step_trains_nothing_and_keeps_the_version(tmp_path):
    """NaN in one RL step's gradients: the optimizer step is skipped, its samples are dropped with reason
    skipped_step (not counted as trained), and the policy version does not move."""
    layer = "decoder.layers.1.mlp.linear_fc1"
    s = run(tmp_path, 'executor.mode="sync"', 'inject.kind="nonfinite"', f'inject.layer="{layer}"',
            "inject.start_step=7")   # the 3rd RL step, after 5 warm-start steps
    acct = s["samples"]
    assert s["skipped_steps"] == [8]
    assert acct["dropped"] == {"skipped_step": 8} and acct["trained"] == 5 * 8
    assert acct["generated"] == acct["trained"] + sum(acct["dropped"].values()) + acct["in_flight"]
    state = torch.load(next((tmp_path / "run" / "checkpoints").iterdir()), weights_only=True)
    assert state["rl"]["trainer"]["version"] == 5, "six RL steps, one skipped"


def test_weights_are_published_before_the_version_advances(tmp_path, monkeypatch):
    """A rollout admitted because the version moved on must find that version's weights: the trainer
    publishes them first (otherwise it generates with the old ones and its samples arrive staler)."""
    from rl.algo.staleness import StalenessController

    seen = []
    advance = StalenessController.advance

    def checked_advance(ctrl):
        seen.append(RLTrainer.current.worker.channel.version == ctrl.version + 1)
        return advance(ctrl)

    init = RLTrainer.__init__

    def remember(self, *a, **k):
        init(self, *a, **k)
        RLTrainer.current = self

    monkeypatch.setattr(RLTrainer, "__init__", remember)
    monkeypatch.setattr(StalenessController, "advance", checked_advance)
    run(tmp_path, 'executor.mode="sync"', "train.steps=3")
    assert seen == [True, True, True]


def test_top_p_samples_from_the_nucleus_and_scores_under_the_full_softmax():
    from rl.inference.decode import sample_next

    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0, -2.0]]).repeat(400, 1)
    tok, logp = sample_next(logits, 1.0, 0.8, torch.Generator().manual_seed(0))
    full = torch.log_softmax(logits[0], -1)
    assert set(tok.tolist()) <= {0, 1}, "only the nucleus (the two tokens holding 80% of the mass) is sampled"
    assert torch.equal(logp, full[tok])


def test_rollouts_that_keep_failing_end_the_run_with_the_error(tmp_path, monkeypatch):
    """Sync mode used to spin forever (10,000 failed rollouts counted as generated): now the run ends after
    max_consecutive_rollout_failures with the underlying error."""
    from rl.inference.rollout import RolloutEngine
    from rl.workers.worker import RolloutFailure

    def broken(self, *a, **k):
        raise ConnectionError("inference server unreachable")

    monkeypatch.setattr(RolloutEngine, "generate", broken)
    with pytest.raises(RolloutFailure, match="3 rollouts in a row failed.*ConnectionError: inference server"):
        run(tmp_path, 'executor.mode="sync"', "train.warm_start_steps=0", "rl.max_consecutive_rollout_failures=3")


def test_rollouts_failing_most_of_the_time_end_the_run(tmp_path, monkeypatch):
    """Failures that are never 3 in a row but two calls of three (a policy blown up by lr=1e30 samples from NaN
    probabilities most of the time: found by the fault suite, where such a run ended rc 0 at reward 0) end the
    run once they exceed rl.max_failed_rollout_fraction; one failure in three does not."""
    from rl.inference.rollout import RolloutEngine
    from rl.workers.worker import RolloutFailure

    original, calls = RolloutEngine.generate, []

    def flaky(every):
        def generate(self, *a, **k):
            calls.append(1)
            if len(calls) % 3 < every:
                raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
            return original(self, *a, **k)
        return generate

    monkeypatch.setattr(RolloutEngine, "generate", flaky(2))
    with pytest.raises(RolloutFailure, match=r"of \d+ rollouts failed \(more than rl.max_failed_rollout_fraction"):
        run(tmp_path / "most", 'executor.mode="sync"', "train.warm_start_steps=0",
            "rl.max_consecutive_rollout_failures=3")
    calls.clear()
    monkeypatch.setattr(RolloutEngine, "generate", flaky(1))
    s = run(tmp_path / "some", 'executor.mode="sync"', "train.warm_start_steps=0",
            "rl.max_consecutive_rollout_failures=3", "train.steps=18")
    failed, made = s["samples"]["failed_rollouts"], s["samples"]["generated"]
    assert failed >= 5 * 8 and failed / (failed + made) <= 1 / 3 and s["samples"]["trained"] == 18 * 8


class RaisingRewards(ReverseDigits):
    def reward(self, problem, completion):
        import threading

        if threading.current_thread().name == "rollout-worker":   # held-out evaluation scores as usual
            raise KeyError("reward service lost the problem")
        return super().reward(problem, completion)


def test_a_dead_rollout_worker_is_reported_at_once_with_its_traceback(tmp_path, monkeypatch):
    """An exception outside generation (reward scoring) used to kill the worker thread silently; the trainer
    then waited 120 s. Now it raises at its next wait, with the worker's traceback."""
    import time

    from rl.workers.worker import RolloutFailure

    monkeypatch.setattr("rl.workload.make_task", RaisingRewards)
    t0 = time.perf_counter()
    with pytest.raises(RolloutFailure, match=r"(?s)rollout worker died: KeyError.*reward service.*Traceback"):
        run(tmp_path, 'executor.mode="async"', "train.warm_start_steps=0")
    assert time.perf_counter() - t0 < 60


def test_a_lost_sample_breaks_the_accounting(tmp_path, monkeypatch):
    """The end-of-run check counts what is physically in flight, so losing a group anywhere (here: a batch
    that silently forgets one) fails the run instead of balancing by construction."""
    original = RLTrainer.next_batch

    def leaky(self, *a, **k):
        batch = original(self, *a, **k)
        if not getattr(self, "_leaked", False):
            self._leaked = True
            self.queue.get(timeout=30)   # a group taken from the queue, never trained nor dropped
        return batch

    monkeypatch.setattr(RLTrainer, "next_batch", leaky)
    with pytest.raises(RuntimeError, match="sample accounting broken.*4 unaccounted"):
        run(tmp_path, 'executor.mode="async"')


@pytest.mark.parametrize("override, message", [
    ("rl.loss.icepop_band=[0.5, inf]", "rl.loss.icepop_band[1]: must be a finite number"),
    ("rollout.temperature=nan", "rollout.temperature: must be a finite number"),
    ("train.lr=0", "train.lr: must be in (0, 10], got 0.0"),
    ("train.lr=-1e-3", "train.lr: must be in (0, 10]"),
    ("rl.loss.tis_cap=0", "rl.loss.tis_cap: must be in (0, 1e6]"),
    ("train.warm_start_batch=0", "train.warm_start_batch: must be in [1, 2^20]"),
    ("model.vocab_size=10", "model.vocab_size: the tokenizer (bytes) has 256 tokens, more than the model's vocabulary of 10"),
    ("task.heldout_size=60000", "heldout_size 60000 needs more than half of the 111000 distinct problems"),
])
def test_meaningless_rl_values_are_refused_before_anything_is_written(tmp_path, override, message):
    from precisionrt.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        run(tmp_path, override)
    assert not (tmp_path / "run").exists()


def test_a_run_that_skips_most_steps_stops_with_a_clear_error(tmp_path):
    """NaN gradients from the 2nd RL step on (after 5 warm-start steps): every later step is skipped. Such
    a run used to end rc 0, its reward at 0, with nothing saying why."""
    from precisionrt.run.harness import TooManySkippedSteps

    with pytest.raises(TooManySkippedSteps, match=r"5 of 6 optimizer steps were skipped.*max_skipped_fraction"):
        run(tmp_path, 'executor.mode="sync"', "train.steps=12", 'inject.kind="nonfinite"',
            'inject.layer="decoder.layers.1.mlp.linear_fc1"', "inject.start_step=6", "inject.ramp_steps=100")


def test_a_nonfinite_gradient_in_the_warm_start_is_skipped_and_promotes(tmp_path):
    """Fault injection used to never fire during the warm start, silently."""
    layer = "decoder.layers.1.mlp.linear_fc1"
    s = run(tmp_path, 'executor.mode="sync"', 'inject.kind="nonfinite"', f'inject.layer="{layer}"',
            "inject.start_step=2")   # the 3rd warm-start step
    assert s["skipped_steps"] == [3]
    assert [(w["step"], w["layer"], w["reason"]) for w in s["switches"]][:1] == [(3, layer, "nonfinite")]


def test_an_engine_pool_pulls_weights_by_version_only_when_behind(parallel):
    """Two engines behind one interface: publications are not pushed; each engine loads the newest weights
    once, when it next generates, and its completions carry that version. Greedy, the pool gives the tokens
    one engine gives."""
    from conftest import SMALL
    from rl.inference.pool import EnginePool
    from rl.inference.rollout import RolloutConfig, RolloutEngine

    cfg = RolloutConfig(precision="bf16", temperature=0.0)
    pool, single = EnginePool([RolloutEngine(SMALL, cfg), RolloutEngine(SMALL, cfg)]), RolloutEngine(SMALL, cfg)
    weights = {k: v.clone() for k, v in single.model.state_dict().items() if isinstance(v, torch.Tensor)}
    for version in (1, 2, 3):
        pool.load_weights(weights, version)
    assert pool.pulls == [0, 0] and [e.version for e in pool.engines] == [-1, -1], "nothing pushed"
    single.load_weights(weights, 3)
    prompts = [bytes(48 + (i + j) % 10 for j in range(4 + i % 3)) for i in range(6)]
    got = pool.generate(prompts, 6, torch.Generator().manual_seed(0))
    assert pool.pulls == [1, 1] and {c.version for c in got} == {3}
    assert [c.tokens for c in got] == [c.tokens for c in single.generate(prompts, 6, torch.Generator())]
    pool.generate(prompts[:1], 6, torch.Generator())   # one prompt: one engine; no new version, no pull
    assert pool.pulls == [1, 1]
    pool.load_weights(weights, 4)
    pool.generate(prompts[:1], 6, torch.Generator())
    assert pool.pulls == [2, 1] and pool.engines[1].version == 3, "the idle engine stays behind until it works"
    pool.close()


def test_a_killed_ray_rollout_actor_is_replaced_and_the_run_completes(tmp_path, monkeypatch):
    """The rollout actor is killed mid-run: the failing call is noticed at once, a new actor takes the last
    weights, the lost rollouts are counted, and every sample is still accounted for."""
    pytest.importorskip("ray")
    from rl.inference.executors import RayRolloutEngine

    calls = []
    original = RayRolloutEngine.generate

    def kill_on_third(self, *a):
        calls.append(1)
        if len(calls) == 3:
            self.ray.kill(self.actor)
        return original(self, *a)

    monkeypatch.setattr(RayRolloutEngine, "generate", kill_on_third)
    s = run(tmp_path, 'executor.kind="ray"', 'executor.mode="sync"')
    acct = s["samples"]
    assert acct["trained"] == 48 and acct["failed_rollouts"] == 8 and acct["worker_lost"] == 8
    assert acct["generated"] == acct["trained"] + sum(acct["dropped"].values()) + acct["in_flight"]
    assert any("rollout actor died during generate (restart 1 of 3)" in e for e in s["rollout_errors"])


def test_both_engines_implement_the_engine_protocol(parallel):
    """The trainer sees engines only through rl.inference.engine.InferenceEngine: the local engine is one at run time,
    and the Ray engine's methods take the same parameters (checked without starting a cluster)."""
    import inspect

    from conftest import SMALL
    from rl.inference.engine import InferenceEngine, WorkerLost
    from rl.inference.executors import RayRolloutEngine, RolloutActorLost
    from rl.inference.rollout import RolloutConfig, RolloutEngine

    local = RolloutEngine(SMALL, RolloutConfig())
    assert isinstance(local, InferenceEngine) and local.version == -1
    for method in ("load_weights", "generate", "close"):
        want = list(inspect.signature(getattr(InferenceEngine, method)).parameters)
        for engine in (RolloutEngine, RayRolloutEngine):
            assert list(inspect.signature(getattr(engine, method)).parameters) == want, (engine, method)
    assert issubclass(RolloutActorLost, WorkerLost), "a dead actor's rollouts count as worker_lost"


@pytest.mark.parametrize("rollout_precision", ["follow", "fp8"])
def test_the_precision_map_travels_with_the_weights(tmp_path, monkeypatch, rollout_precision):
    """A NaN gradient promotes a layer in the 3rd RL step. The trainer's precision map moves to version 1; the
    engine takes it from the same snapshot as the weights (the step was skipped, so with the same policy
    version 2); under "follow" its layer runs BF16 from then on, under "fp8" it stays FP8 and the version is
    recorded all the same. Every sample records the versions the engine held when it made it."""
    from rl.inference.rollout import RolloutEngine

    layer = "decoder.layers.1.mlp.linear_fc1"
    calls, original = [], RolloutEngine.generate

    def spy(self, *a, **k):
        out = original(self, *a, **k)
        calls.append((self.version, self.map_version, self.precisions()[layer], {(c.version, c.map_version)
                                                                                for c in out}))
        return out

    monkeypatch.setattr(RolloutEngine, "generate", spy)
    # whole layers: a NaN in the output gradient moves the layer's fprop too (per GEMM it would not: below)
    s = run(tmp_path, 'executor.mode="sync"', f'rollout.precision="{rollout_precision}"', 'inject.kind="nonfinite"',
            f'inject.layer="{layer}"', "inject.start_step=7",   # warm start steps 1-5, RL step 3 is step 8
            'precision.policy.granularity="layer"')
    assert s["skipped_steps"] == [8]
    assert s["rollout_precision_changes"] == [{"map_version": 1, "step": 8, "layers": {layer: "bf16"}}]
    assert s["rollout_maps_applied"] == [[0, 0], [1, 2]]
    for version, map_version, precision, recorded in calls:
        assert recorded == {(version, map_version)}, "a sample records the engine's versions when it was made"
        assert precision == ("bf16" if map_version == 1 and rollout_precision == "follow" else "fp8")
    assert {m for _, m, _, _ in calls} == {0, 1}
    assert sum(s["trained_by_map_version"].values()) == s["samples"]["trained"]
    assert set(s["k3_kl_by_map_version"]) == {"0", "1"} and all(v >= 0 for v in s["k3_kl_by_map_version"].values())


def test_follow_follows_the_forward_gemm(tmp_path):
    """Per GEMM (the default), a NaN in a layer's output gradient promotes its dgrad and wgrad, not its fprop:
    inference runs fprop only, so under "follow" the rollout's map does not change."""
    layer = "decoder.layers.1.mlp.linear_fc1"
    s = run(tmp_path, 'executor.mode="sync"', 'rollout.precision="follow"', 'inject.kind="nonfinite"',
            f'inject.layer="{layer}"', "inject.start_step=7")
    assert s["skipped_steps"] == [8]
    assert {(w["layer"], w["gemm"]) for w in s["switches"]} == {(layer, "dgrad"), (layer, "wgrad")}
    assert s["rollout_precision_changes"] == [] and s["rollout_maps_applied"] == [[0, 0]]


def test_a_precision_map_must_name_the_models_layers(parallel):
    from conftest import SMALL
    from rl.inference.rollout import RolloutConfig, RolloutEngine

    engine = RolloutEngine(SMALL, RolloutConfig(precision="follow"))
    names = list(engine.precisions())
    with pytest.raises(ValueError, match="missing .*decoder.layers"):
        engine.set_precisions({n: "bf16" for n in names[1:]}, 1)
    engine.set_precisions({**{n: "fp8" for n in names}, names[0]: "bf16"}, 1)
    assert engine.precisions()[names[0]] == "bf16" and engine.map_version == 1


def test_an_injected_outlier_reaches_the_rollout_copy(tmp_path, monkeypatch):
    """The outlier (input channel x factor, weight column / factor) is set on the trainer's layer from RL step
    2; it travels with the weights, so the engine computes with it from the weights of version 2 on (a real
    outlier lives in what both sides share), and not before."""
    from precisionrt.layers.linear import precision_layers
    from rl.inference.rollout import RolloutEngine

    layer = "decoder.layers.1.mlp.linear_fc2"
    calls, original = [], RolloutEngine.generate

    def spy(self, *a, **k):
        scale = precision_layers(self.model)[layer].channel_scale
        calls.append((self.version, None if scale is None else scale[:2].tolist()))
        return original(self, *a, **k)

    monkeypatch.setattr(RolloutEngine, "generate", spy)
    run(tmp_path, 'executor.mode="sync"', 'inject.kind="outlier"', f'inject.layer="{layer}"', "inject.start_step=6",
        "inject.factor=1000", "inject.channels=[0]")   # injector step 5 is RL step 1
    assert all((scale is None) == (version < 2) for version, scale in calls), calls
    assert all(scale == [1000.0, 1.0] for version, scale in calls if version >= 2) and calls[-1][0] >= 2


def test_a_resumed_run_keeps_its_precision_map(tmp_path, monkeypatch):
    """Stopped after the map moved to version 1 (RL step 4) and resumed: the engine starts from map 1 with the
    layer in BF16 under "follow", the summary still lists the change made before the checkpoint, and the
    maps the engine took in this segment start from the checkpoint's."""
    layer = "decoder.layers.1.mlp.linear_fc1"
    calls = spy_on_rollouts(monkeypatch, layer)
    sets = ['executor.mode="sync"', 'rollout.precision="follow"', 'inject.kind="nonfinite"', f'inject.layer="{layer}"',
            "inject.start_step=7", 'precision.policy.granularity="layer"']
    run(tmp_path, *sets, "train.stop_at_step=4")
    calls.clear()
    s = run(tmp_path, *sets, "train.resume=true")
    assert s["resumed_from"] == 4 and calls and set(calls) == {(1, "bf16")}
    assert s["rollout_precision_changes"] == [{"map_version": 1, "step": 8, "layers": {layer: "bf16"}}]
    assert s["rollout_maps_applied"][0] == [1, 3]


def test_engine_scores_what_it_generated(parallel):
    """The attribution rescoring path agrees with generation: greedy BF16 completions rescored in one pass give
    the generation's own log-probs (within BF16 GEMM-shape rounding), and forcing a layer to BF16 for one call
    leaves the engine as it was."""
    from conftest import SMALL
    from rl.inference.rollout import RolloutConfig, RolloutEngine

    torch.manual_seed(0)
    engine = RolloutEngine(SMALL, RolloutConfig(precision="bf16", temperature=0.0))
    comps = engine.generate([b"123", b"45678"], 8, torch.Generator().manual_seed(0))
    scored = engine.score([list(c.prompt) + c.tokens for c in comps], [len(c.prompt) for c in comps], [])
    for c, s in zip(comps, scored):
        assert len(s) == len(c.tokens) and s == pytest.approx(c.logp_infer, abs=2e-3)
    fp8 = RolloutEngine(SMALL, RolloutConfig(precision="fp8"))
    name = next(iter(fp8.precisions()))
    fp8.score([[1, 2, 3, 4]], [2], [name])
    assert set(fp8.precisions().values()) == {"fp8"}


def test_attribution_finds_the_layer_that_carries_the_mismatch(tmp_path):
    """An outlier enters fc2 of layer 1 at the first RL step and reaches the rollout copy; the trainer promotes
    the layer at its first check, the FP8 rollout keeps it in FP8. Scored with that layer alone in BF16, the
    rollout's mismatch vanishes (share 1 here: in sync mode the other layers compute identically on both sides);
    any other layer in BF16 leaves it, or adds its own (measured: -0.13 to 0.09)."""
    layer = "decoder.layers.1.mlp.linear_fc2"
    s = run(tmp_path, 'executor.mode="sync"', "train.steps=24", "rl.attribution_every=1", "rl.attribution_samples=8",
            "precision.monitor.check_interval=2", 'inject.kind="outlier"', f'inject.layer="{layer}"',
            "inject.start_step=5", "inject.factor=1e6", "inject.channels=[0]")
    assert [(sw["layer"], sw["to"]) for sw in s["switches"]][:1] == [(layer, "bf16")]
    shares = s["mismatch_share"]
    assert len(shares) == 8 and shares[layer] > 0.9, shares
    assert all(v < 0.5 for n, v in shares.items() if n != layer), shares


def test_kv_cache_decoding_equals_full_recomputation(parallel):
    """Greedy BF16 decoding with the KV cache gives the tokens of full recomputation at every step, and their
    log-probs within BF16 GEMM-shape rounding (measured 1.2e-5). FP8 with per-tensor current scaling is not
    held to this: a cached step scales the new tokens by their own amax, a full step by the whole sequence's,
    and greedy paths can part (13 of 16 sequences identical at 40 tokens in a check)."""
    from precisionrt.models.gpt import ModelConfig
    from rl.inference.rollout import RolloutConfig, RolloutEngine

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=64,
                      vocab_size=256)
    torch.manual_seed(0)
    full = RolloutEngine(cfg, RolloutConfig(precision="bf16", temperature=0.0))
    cached = RolloutEngine(cfg, RolloutConfig(precision="bf16", temperature=0.0, kv_cache=True))
    cached.load_weights(full.model.state_dict(), 0)
    prompts = [bytes(48 + (i * 7 + j) % 10 for j in range(8 + i % 3)) for i in range(12)]   # three lengths
    a = full.generate(prompts, 40, torch.Generator().manual_seed(0))
    b = cached.generate(prompts, 40, torch.Generator().manual_seed(0))
    assert [c.tokens for c in a] == [c.tokens for c in b] and all(len(c.tokens) == 40 for c in a)
    for x, y in zip(a, b):
        assert y.logp_infer == pytest.approx(x.logp_infer, abs=1e-4)
    from precisionrt.layers.attention import SDPACoreAttention
    assert all(m.kv_cache is None for m in cached.model.modules() if isinstance(m, SDPACoreAttention)), \
        "the caches go with the call"


def test_rl_with_the_kv_cache_accounts_for_every_sample(tmp_path):
    s = run(tmp_path, "rollout.kv_cache=true")
    acct = s["samples"]
    assert acct["trained"] == 48 and acct["failed_rollouts"] == 0
    assert acct["generated"] == acct["trained"] + sum(acct["dropped"].values()) + acct["in_flight"]


@pytest.mark.parametrize("kv_cache", [False, True])
def test_prompts_of_different_lengths_decode_in_one_padded_batch_as_alone(parallel, kv_cache):
    """Left padding with its mask and per-row positions changes nothing a row computes: greedy BF16, each prompt
    decoded in a batch of seven lengths gives the tokens it gives alone, log-probs within GEMM-shape rounding.
    Breaking the mask (pad keys visible) or the positions (not shifted by the padding) fails this."""
    from precisionrt.models.gpt import ModelConfig
    from rl.inference.rollout import RolloutConfig, RolloutEngine

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=64,
                      vocab_size=256)
    torch.manual_seed(0)
    engine = RolloutEngine(cfg, RolloutConfig(precision="bf16", temperature=0.0, kv_cache=kv_cache))
    prompts = [bytes(48 + (i * 7 + j) % 10 for j in range(3 + 5 * i)) for i in range(7)]   # 3 to 33 tokens
    together = engine.generate(prompts, 20, torch.Generator())
    for p, c in zip(prompts, together):
        alone = engine.generate([p], 20, torch.Generator())[0]
        assert c.tokens == alone.tokens and len(c.tokens) >= 5
        assert c.logp_infer == pytest.approx(alone.logp_infer, abs=1e-4)
