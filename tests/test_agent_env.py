"""The multi-turn calculator environment and the transcripts its episodes make: loss masks (GLM-5 error
masking), the tool's delays, failures, hangs and timeouts, and episodes that wait without blocking each other."""

import asyncio
import random
import statistics
import time

import pytest
import torch

from rl.envs.agent import Segment, Transcript
from rl.envs.calculator import CalculatorEnv, EnvConfig, ToolConfig
from rl.envs.task import TaskConfig

TASK = TaskConfig(name="calculator", min_digits=3, max_digits=4)

FAST = ToolConfig(delay_median=0.001, delay_sigma=0.0, failure_rate=0.0, hang_rate=0.0, timeout=1.0)


def crafted() -> Transcript:
    """Q, a malformed call, its error, a call with wrong operands, its error, a good call that the service
    failed, a retry, the result, the answer."""
    return Transcript([
        Segment("prompt", list(b"Q:12*34\n")),
        Segment("action", list(b"C12*34\n"), [-0.1] * 7, 3, error="malformed"),
        Segment("observation", list(b"E:malformed call\n")),
        Segment("action", list(b"C:21*34\n"), [-0.2] * 8, 3, error="wrong_arguments"),
        Segment("observation", list(b"E:wrong arguments\n")),
        Segment("action", list(b"C:12*34\n"), [-0.3] * 8, 4, error="unavailable"),
        Segment("observation", list(b"E:service unavailable\n")),
        Segment("action", list(b"C:12*34\n"), [-0.4] * 8, 5),
        Segment("observation", list(b"R:408\n")),
        Segment("action", list(b"A:408\n"), [-0.5] * 6, 5),
    ])


def test_error_masking_masks_the_policys_errors_and_trains_the_recovery():
    t = crafted()
    masked, unmasked = t.loss_mask(error_masking=True), t.loss_mask(error_masking=False)
    assert len(masked) == len(t.tokens) == len(t.logp_infer()) == len(t.versions())
    spans, i = [], 0
    for s in t.segments:
        spans.append((s, masked[i:i + len(s.tokens)], unmasked[i:i + len(s.tokens)]))
        i += len(s.tokens)
    for s, m, u in spans:
        if s.kind != "action":
            assert set(m) == set(u) == {0}, "prompt and observation tokens are never trained"
        elif s.error in ("malformed", "wrong_arguments"):
            assert set(m) == {0} and set(u) == {1}, "the policy's own error: masked only under error masking"
        else:
            assert set(m) == set(u) == {1}, "the recovery, and a call the world failed, are trained"
    assert sum(masked) == 8 + 8 + 6 and sum(unmasked) == 7 + 8 + 8 + 8 + 6
    assert t.policy_errors == 2 and t.oldest_version == 3
    assert [v for v in t.versions() if v >= 0] == [3] * 15 + [4] * 8 + [5] * 14, "each token keeps its version"
    assert t.logp_infer()[:8] == [0.0] * 8 and t.logp_infer()[8:15] == [-0.1] * 7


def run(coro):
    return asyncio.run(coro)


def test_protocol_answers_errors_and_scores():
    env = CalculatorEnv(TASK, EnvConfig(tool=FAST), tool_seed=0)

    async def episode():
        ep = await env.reset(random.Random(0))
        a, op, b = ep.a, ep.op, ep.b
        assert ep.prompt == f"Q:{a}{op}{b}\n".encode() and (a, op, b) not in {(e.a, e.op, e.b) for e in env.heldout()}
        bad = await env.step(ep, b"C:" + str(a).encode())
        wrong = await env.step(ep, f"C:{a + 1}{op}{b}".encode())
        good = await env.step(ep, f"C:{a}{op}{b}".encode())
        assert not ep.done
        await env.step(ep, b"A:" + str(ep.result).encode())
        return ep, bad, wrong, good

    ep, bad, wrong, good = run(episode())
    assert (bad.tokens, bad.error) == (b"E:malformed call\n", "malformed")
    assert (wrong.tokens, wrong.error) == (b"E:wrong arguments\n", "wrong_arguments")
    expected = ep.a + ep.b if ep.op == "+" else ep.a * ep.b   # independent of the env's own arithmetic
    assert good.tokens == f"R:{expected}\n".encode() and good.error is None
    assert ep.done and env.score(ep) == 1.0 and ep.errors == {"malformed": 1, "wrong_arguments": 1}
    ep.answer = str(expected)[:-1].encode() + b"x"
    assert env.score(ep) == pytest.approx((len(str(expected)) - 1) / len(str(expected)))
    with pytest.raises(ValueError, match="finished"):
        run(env.step(ep, b"A:1"))


def test_unanswered_episode_ends_at_max_turns_with_no_reward():
    env = CalculatorEnv(TASK, EnvConfig(max_turns=2, tool=FAST))

    async def episode():
        ep = await env.reset(random.Random(1))
        await env.step(ep, b"hello")
        await env.step(ep, b"C:1+1")
        return ep

    ep = run(episode())
    assert ep.done and ep.answer is None and env.score(ep) == 0.0


def test_a_hanging_tool_is_cut_at_its_timeout_and_counted():
    env = CalculatorEnv(TASK, EnvConfig(tool=ToolConfig(hang_rate=1.0, timeout=0.05)))

    async def episode():
        ep = await env.reset(random.Random(0))
        t0 = time.perf_counter()
        obs = await env.step(ep, f"C:{ep.a}{ep.op}{ep.b}".encode())
        return ep, obs, time.perf_counter() - t0

    ep, obs, waited = run(episode())
    assert (obs.tokens, obs.error) == (b"E:timeout\n", "timeout")
    assert 0.05 <= waited < 0.5 and ep.tool_wait >= 0.05
    assert env.stats["timeout"] == 1 and ep.errors == {"timeout": 1}


def test_waiting_episodes_do_not_block_each_other():
    """64 calls of 0.1 s each, all in flight together: about 0.1 s in all, not 6.4 s."""
    env = CalculatorEnv(TASK, EnvConfig(tool=ToolConfig(delay_median=0.1, delay_sigma=0.0, failure_rate=0.0,
                                                        hang_rate=0.0)))

    async def many():
        rng = random.Random(0)
        eps = [await env.reset(rng) for _ in range(64)]
        t0 = time.perf_counter()
        obs = await asyncio.gather(*(env.step(e, f"C:{e.a}{e.op}{e.b}".encode()) for e in eps))
        return obs, time.perf_counter() - t0

    obs, wall = run(many())
    assert all(o.error is None for o in obs) and wall < 1.0


def test_tool_delays_are_long_tailed_and_failures_at_their_rate():
    cfg = ToolConfig()
    rng = random.Random(0)
    delays = sorted(cfg.draw_delay(rng) for _ in range(20000))
    assert statistics.median(delays) == pytest.approx(0.1, rel=0.05)
    assert delays[int(0.99 * len(delays))] > 1.0, "p99 above a second"
    env = CalculatorEnv(TASK, EnvConfig(tool=ToolConfig(delay_median=0.0, failure_rate=0.3, hang_rate=0.0)),
                        tool_seed=3)

    async def calls():
        rng = random.Random(0)
        eps = [await env.reset(rng) for _ in range(1000)]
        return await asyncio.gather(*(env.step(e, f"C:{e.a}{e.op}{e.b}".encode()) for e in eps))

    failed = sum(o.error == "unavailable" for o in run(calls()))
    assert 240 <= failed <= 360 and env.stats["unavailable"] == failed


def test_env_config_is_checked():
    with pytest.raises(ValueError, match="failure_rate"):
        ToolConfig(failure_rate=1.5)
    with pytest.raises(ValueError, match="operators"):
        EnvConfig(operators="-")
    with pytest.raises(ValueError, match="max_turns"):
        EnvConfig(max_turns=1)


def test_partial_rollouts_keep_each_actions_version_and_log_probs(parallel):
    """Weights change between two decode calls (as the trainer publishes them): an episode's actions carry the
    versions and log-probabilities that produced them, observations carry none and train nothing, and the
    episode is as stale as its oldest action."""
    from conftest import SMALL

    from rl.workers.agent import DecodeBatcher, as_completion, run_group
    from rl.inference.rollout import RolloutConfig, RolloutEngine

    import dataclasses
    model_cfg = dataclasses.replace(SMALL, seq_length=96)
    engine = RolloutEngine(model_cfg, RolloutConfig(precision="bf16"))
    weights = {k: v.clone() for k, v in engine.model.state_dict().items() if isinstance(v, torch.Tensor)}
    engine.load_weights(weights, 0)
    made = []

    def decode(prompts, keys):
        comps = engine.generate(prompts, 8, torch.Generator().manual_seed(len(made)))
        made.extend(comps)
        engine.load_weights(weights, engine.version + 1)   # the next call decodes with a newer version
        return comps

    env = CalculatorEnv(TaskConfig(name="calculator", min_digits=1, max_digits=1, heldout_size=16),
                        EnvConfig(max_turns=3, tool=FAST))

    async def group():
        return await run_group(env, random.Random(0), 4, DecodeBatcher(decode), 8, model_cfg.seq_length)

    _, results = asyncio.run(group())
    by_tokens = {(c.prompt, tuple(c.tokens)): c for c in made}
    assert all(sum(s.kind == "action" for s in r.transcript.segments) == 3 for r in results), \
        "an untrained policy never answers: three actions, three versions"
    for r in results:
        actions = [s for s in r.transcript.segments if s.kind == "action"]
        assert len({s.version for s in actions}) == len(actions), "one version per decode call"
        context = r.transcript.segments[0].tokens
        for seg in r.transcript.segments[1:]:
            if seg.kind == "action":
                made_by = by_tokens[(tuple(context), tuple(seg.tokens))]
                assert seg.logp == made_by.logp_infer and seg.version == made_by.version
            context = context + seg.tokens
        c = as_completion(r, error_masking=True)
        assert c.version == min(s.version for s in actions) and len(c.mask) == len(c.tokens) == len(c.logp_infer)
        obs = [i for i, v in enumerate(c.token_versions) if v == -1]
        assert all(c.mask[i] == 0 and c.logp_infer[i] == 0.0 for i in obs)
        assert sorted(set(c.token_versions) - {-1}) == sorted(s.version for s in actions)





def test_a_call_cancelled_with_its_episode_is_not_counted():
    """The run stopping cancels the episodes in flight: their pending calls end neither answered nor failed, so
    they are not counted as calls (the counters stay equal to what ended: calls = answered + failed)."""
    env = CalculatorEnv(TASK, EnvConfig(tool=ToolConfig(hang_rate=1.0, timeout=10.0)))

    async def cancelled():
        ep = await env.reset(random.Random(0))
        task = asyncio.create_task(env.step(ep, f"C:{ep.a}{ep.op}{ep.b}".encode()))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancelled())
    assert env.stats["calls"] == 0 and env.stats["timeout"] == 0


def test_warm_start_demonstrations_replay_against_the_env():
    """Each demonstration, replayed action by action against the env (a tool that never fails), gets the
    observations it shows (the error it marks, then the result) and reward 1: the warm start teaches the real
    protocol, and the errors it marks are the ones the env would report."""
    env = CalculatorEnv(TASK, EnvConfig(tool=FAST))
    rng, errors = random.Random(0), random.Random(1)
    kinds = set()

    async def replay(ep, t):
        for seg, nxt in zip(t.segments[1:], t.segments[2:] + [None]):
            if seg.kind != "action":
                continue
            obs = await env.step(ep, bytes(seg.tokens).rstrip(b"\n"))
            if seg.error in ("malformed", "wrong_arguments"):
                assert obs.error == seg.error and bytes(nxt.tokens) == obs.tokens
            elif seg.error is None and nxt is not None:
                assert bytes(nxt.tokens) == obs.tokens
        return ep

    for _ in range(60):
        episode = env.sample(rng)
        t = env.demonstration(episode, errors)
        kinds |= {s.error for s in t.segments if s.kind == "action"}
        assert env.score(run(replay(episode, t))) == 1.0
    assert kinds == {None, "malformed", "wrong_arguments", "unavailable"}


def test_cross_turn_kv_cache_equals_full_recomputation(parallel):
    """Greedy BF16, three turns of eight conversations of different lengths: decoding each turn on the cached
    keys and values of the conversation so far (only the last action's last token and the observation are new)
    gives the tokens of encoding everything again, log-probs within GEMM-shape rounding, and the caches did
    spare the earlier turns. New weights drop the caches (they were computed with the old ones)."""
    import dataclasses

    from conftest import SMALL

    from rl.inference.rollout import RolloutConfig, RolloutEngine

    cfg = dataclasses.replace(SMALL, seq_length=128)
    torch.manual_seed(0)
    cached = RolloutEngine(cfg, RolloutConfig(precision="bf16", temperature=0.0, kv_cache=True))
    full = RolloutEngine(cfg, RolloutConfig(precision="bf16", temperature=0.0, kv_cache=True))
    weights = {k: v for k, v in cached.model.state_dict().items() if isinstance(v, torch.Tensor)}
    full.load_weights(weights, 0)
    contexts = [f"Q:{i * 37 % 1000}*{i + 3}\n".encode() for i in range(8)]
    keys = [f"ep{i}" for i in range(8)]
    for turn in range(3):
        a = cached.generate(contexts, 10, torch.Generator(), keys=keys)
        b = full.generate(contexts, 10, torch.Generator())
        assert [c.tokens for c in a] == [c.tokens for c in b]
        for x, y in zip(a, b):
            assert x.logp_infer == pytest.approx(y.logp_infer, abs=1e-4)
        contexts = [q + bytes(c.tokens) + f"E:turn {turn} {i}\n".encode()[: 4 + i] for i, (q, c) in
                    enumerate(zip(contexts, a))]
    assert cached.reused_tokens > 0 and len(cached.sessions) == 8
    cached.load_weights(weights, 1)
    assert cached.sessions == {}
