"""The RL loop's host-read budget, held on the CPU (issue 24, item 1).

On a GPU every read of a tensor's value into Python (``item``, ``tolist``, ``bool``, ``cpu``...) is a host
synchronisation. ``precisionrt.distributed.syncs.HostReads`` counts those reads on any device, so these tests hold the CPU
path to the budget the GPU will have:

* decoding reads at most once per ``rollout.sync_every`` decode steps, plus one transfer at the end: never
  once per token (at most 1/8 read per generated token at the default 16);
* an ordinary trainer step reads once (its metrics and nonfinite flags in one transfer), whatever the number of
  PPO minibatches; a check step adds the runtime's one.

Decoding with fewer reads must not change a sample: completions equal those of a per-token reference loop.
"""

from __future__ import annotations

import pytest
import torch

from precisionrt.config import ConfigError
from precisionrt.models.gpt import ModelConfig, build_gpt
from precisionrt.distributed.syncs import HostReads
from rl.inference import rollout
from rl.inference.rollout import generate
from rl.inference.decode import logits_of, sample_next
from rl.envs.task import STOP
from rl.trainer import RLTrainer
from rl_common import run

LONG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, seq_length=80,
                   vocab_size=256)
PROMPTS = [b"12+34=", b"7+8=", b"123+456="]


@pytest.fixture
def long_model(parallel):
    torch.manual_seed(0)
    return build_gpt(LONG)


def reference_decode(model, prompt: bytes, max_new_tokens: int, temperature: float, generator) -> tuple[list, list]:
    """One prompt, one token at a time, reading each token as it comes (the loop the budget replaces)."""
    seq, tokens, logps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = logits_of(model, torch.tensor([seq]))[:, -1]
            tok, lp = sample_next(logits, temperature, 1.0, generator)
            tokens.append(int(tok[0]))
            logps.append(float(lp[0]))
            if tokens[-1] == STOP:
                break
            seq.append(tokens[-1])
    return tokens, logps


def counted_generate(model, prompts, max_new_tokens, sync_every, kv_cache, seed=0, stop_ids=(STOP,)):
    with HostReads() as reads:
        comps = generate(model, prompts, max_new_tokens, LONG.seq_length, 1.0, 1.0,
                         torch.Generator().manual_seed(seed), kv_cache=kv_cache, stop_ids=stop_ids,
                         sync_every=sync_every)
    return comps, reads


@pytest.mark.parametrize("kv_cache", [False, True])
def test_decoding_reads_once_per_sync_interval_and_once_at_the_end(long_model, kv_cache):
    # a stop token the model never samples: every row decodes the whole budget of 64 steps
    for prompts in ([PROMPTS[0]], PROMPTS):   # one row (reads per token = per step), and a padded batch
        comps, reads = counted_generate(long_model, prompts, 64, 16, kv_cache, stop_ids=(-1,))
        generated = sum(len(c.tokens) for c in comps)
        assert generated == 64 * len(prompts)
        assert reads.count == 64 // 16 - 1 + 1, reads.sites   # steps 16, 32, 48 (64 is the budget) + the transfer
        assert reads.count / generated <= 1 / 8


def test_a_batch_stops_at_the_first_interval_after_its_last_stop(long_model):
    # every token is a stop token: one decode step is enough, the batch runs to the first look (step 16)
    comps, reads = counted_generate(long_model, PROMPTS, 64, 16, True, stop_ids=tuple(range(256)))
    assert [len(c.tokens) for c in comps] == [1, 1, 1] and all(c.stopped for c in comps)
    assert reads.count == 2, reads.sites   # the look at step 16, the transfer


@pytest.mark.parametrize("kv_cache", [False, True])
def test_fewer_reads_change_no_sample(long_model, kv_cache):
    """Per row, the same tokens and log-probs as a per-token reference loop (one row: the generator's draws line
    up), and the same completions for every ``sync_every`` (the extra steps past the last stop draw after them)."""
    for prompt in PROMPTS:
        comps, _ = counted_generate(long_model, [prompt], 40, 16, kv_cache, seed=3)
        tokens, logps = reference_decode(long_model, prompt, 40, 1.0, torch.Generator().manual_seed(3))
        assert comps[0].tokens == tokens
        assert comps[0].logp_infer == pytest.approx(logps, abs=1e-5)   # float32 logits, other kernel shapes
    runs = [counted_generate(long_model, PROMPTS, 40, k, kv_cache, seed=5)[0] for k in (1, 3, 16, 64)]
    for other in runs[1:]:
        assert [(c.tokens, c.logp_infer, c.stopped) for c in other] == \
               [(c.tokens, c.logp_infer, c.stopped) for c in runs[0]]


def _count_reads(monkeypatch, cls, method: str) -> list[tuple[int, object]]:
    """Wraps ``cls.method`` so that every call counts its host reads (on the calling thread); returns the list
    of (reads, result) the calls append to."""
    calls, original = [], getattr(cls, method)

    def counted(self, *a, **k):
        with HostReads() as reads:
            out = original(self, *a, **k)
        calls.append((reads.count, out, reads.sites))
        return out

    monkeypatch.setattr(cls, method, counted)
    return calls


@pytest.mark.parametrize("minibatches", [1, 4])
def test_an_ordinary_rl_step_reads_once(tmp_path, monkeypatch, minibatches):
    """Every trainer step reads once (a check step twice); the rollouts read well under 1/8 per token."""
    steps = _count_reads(monkeypatch, RLTrainer, "train_step")
    decodes = _count_reads(monkeypatch, rollout.RolloutEngine, "generate")
    run(tmp_path, "train.steps=8", "precision.monitor.check_interval=4", f"rl.ppo_minibatches={minibatches}",
        "rl.max_staleness=1", "rollout.sync_every=4")
    assert len(steps) == 8
    per_check = minibatches   # optimizer steps per RL step: every 4th optimizer step is a check step
    for i, (reads, _, sites) in enumerate(steps, start=1):
        checks = sum((5 + (i - 1) * per_check + k) % 4 == 0 for k in range(1, per_check + 1))   # 5 warm-start steps
        assert reads == 1 + checks, (i, sites)
    reads = sum(n for n, _, _ in decodes)
    tokens = sum(len(c.tokens) for _, comps, _ in decodes for c in comps)
    assert tokens > 0 and reads / tokens <= 1 / 8, (reads, tokens)


def test_a_warm_start_step_reads_once(tmp_path, monkeypatch):
    from rl import train as rl_train

    original, counted = rl_train.supervised_warm_start, []

    def wrapped(*a, **k):
        with HostReads() as reads:
            out = original(*a, **k)
        counted.append(reads)
        return out

    monkeypatch.setattr(rl_train, "supervised_warm_start", wrapped)
    run(tmp_path, "train.steps=1", "train.warm_start_steps=12", "precision.monitor.check_interval=4")
    assert len(counted) == 1
    assert counted[0].count == 12 + 3, counted[0].sites   # one per step; the checks at steps 4, 8, 12


def test_cuda_on_a_machine_without_one_is_refused_by_name(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="run.device: 'cuda' was asked for but torch sees no CUDA device"):
        run(tmp_path, 'run.device="cuda"')
    assert not (tmp_path / "run").exists()


def test_the_read_counter_sees_what_it_must():
    """The counter itself: a per-token read put back into a decode loop is counted."""
    t = torch.arange(4.0)
    with HostReads() as reads:
        t[0].item(), t.tolist(), bool(t[1]), int(t[2]), float(t[3]), t.cpu()
        _ = [10, 20][t[1].long()]
    assert [name for name, _ in reads.sites] == ["item", "tolist", "__bool__", "__int__", "__float__", "cpu",
                                                 "__index__"]
    assert all(site.startswith(__file__) for _, site in reads.sites)
