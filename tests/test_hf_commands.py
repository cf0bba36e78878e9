"""Hugging Face models in the commands: ``model.hf_path`` / ``model.hf_init``; in the RL command the chat-template
task, stop at the checkpoint's EOS ids, export after RL, and the exported policy generating in ``transformers``
the greedy tokens our engine generates (BF16 on both sides), the calculator agent's turns as chat messages; in
the LM command the corpus in the checkpoint's tokens.

The tokenizer is the committed ``configs/tokenizers/chatml-bpe-512`` (``tools/make_tokenizer.py``), the
checkpoints tiny random Qwen3 models made here with transformers' own classes."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from hf_models import make_checkpoint

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "configs" / "tokenizers" / "chatml-bpe-512"
HF_CONFIG = ROOT / "configs" / "rl_addition_hf_cpu.toml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen3 with the committed tokenizer's files beside its weights (a user's checkpoint dir)."""
    path = tmp_path_factory.mktemp("hf") / "qwen3"
    make_checkpoint(path, "qwen3", vocab_size=512)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, path / f.name)
    return path


def _tok():
    from precisionrt.models.tokenizer import HFTokenizer

    return HFTokenizer(TOKENIZER)


# ----------------------------------------------------------------------------------- configuration

def test_hf_path_decides_the_architecture_and_refuses_what_it_would_override(checkpoint):
    from precisionrt.config import ConfigError, from_dict
    from precisionrt.models.gpt import ModelConfig

    cfg = from_dict(ModelConfig, {"hf_path": str(checkpoint), "seq_length": 32})
    dims = cfg.dims()
    assert (dims.num_layers, dims.hidden_size, dims.num_attention_heads, dims.vocab_size) == (2, 64, 4, 512)
    for key, value in (("hidden_size", 256), ("num_layers", 3), ("vocab_size", 1024)):
        with pytest.raises(ConfigError, match=f"{key} = {value}: the checkpoint at hf_path decides it"):
            from_dict(ModelConfig, {"hf_path": str(checkpoint), key: value})
    with pytest.raises(ConfigError, match="hf_path: .*no config.json"):
        from_dict(ModelConfig, {"hf_path": str(checkpoint.parent)})
    with pytest.raises(ConfigError, match="two sources"):
        from_dict(ModelConfig, {"hf_path": str(checkpoint), "hf_init": "qwen3"})
    with pytest.raises(ConfigError, match="num_query_groups.*set hf_init"):
        from_dict(ModelConfig, {"num_query_groups": 2})
    with pytest.raises(ConfigError, match="num_query_groups \\(3\\) must divide"):
        from_dict(ModelConfig, {"hf_init": "llama", "num_query_groups": 3})


def test_rl_preflight_names_tokenizer_problems(checkpoint, tmp_path):
    from precisionrt.config import ConfigError, load_config
    from rl.train import RLConfig, check_config

    def check(*sets):
        check_config(load_config(RLConfig, HF_CONFIG, [f'run.dir="{tmp_path / "run"}"', *sets]))

    check()   # the committed config passes
    with pytest.raises(ConfigError, match="model.vocab_size: the tokenizer .* has 512 tokens, more than the "
                                          "model's vocabulary of 256"):
        check("model.vocab_size=256")
    with pytest.raises(ConfigError, match="model.tokenizer_path: .*no tokenizer.json"):
        check(f'model.tokenizer_path="{tmp_path}"')
    with pytest.raises(ConfigError, match="train.export_hf: only a Hugging Face architecture"):
        check('model.hf_init=""', 'model.num_query_groups=0', 'model.tokenizer_path=""', "model.vocab_size=256")


def test_build_gpt_dispatches_to_the_importer(parallel, checkpoint):
    from precisionrt.models.hf.load import from_hf
    from precisionrt.models.gpt import ModelConfig, build_gpt

    cfg = ModelConfig(hf_path=str(checkpoint), seq_length=32)
    ids = torch.randint(0, 512, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        loaded = build_gpt(cfg).eval()(ids, pos, None)
        direct = from_hf(checkpoint, dtype="float32").eval()(ids, pos, None)
        shape_only = build_gpt(cfg, load_weights=False).eval()(ids, pos, None)
    assert torch.equal(loaded, direct)
    assert not torch.allclose(shape_only, direct), "load_weights=False: the architecture only, weights unread"
    init = build_gpt(ModelConfig(hf_init="qwen3", num_layers=2, hidden_size=64, num_attention_heads=4,
                                 num_query_groups=2, ffn_hidden_size=128, vocab_size=512, seq_length=32))
    shapes = {k: tuple(v.shape) for k, v in init.state_dict().items() if isinstance(v, torch.Tensor)}
    assert shapes == {k: tuple(v.shape) for k, v in build_gpt(cfg).state_dict().items()
                      if isinstance(v, torch.Tensor)}, "hf_init builds what the checkpoint of those dims loads"


# ----------------------------------------------------------------------------------- the chat task

def test_chat_task_prompts_answers_and_warm_start_examples_are_the_transcript():
    import random

    from rl.envs import TaskConfig, make_task
    from rl.envs.chat import wrap

    tok = _tok()
    task = wrap(make_task(TaskConfig(name="addition", min_digits=3, max_digits=3)), tok)
    p = task.sample(random.Random(0))
    assert tok.decode(list(p.prompt)).startswith("<|im_start|>user\n") and \
        tok.decode(list(p.prompt)).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert len(p.prompt) <= task.max_prompt_tokens
    prompt, completion = task.format_example(p, p.target)
    assert completion[-1] == tok.eos_ids[0] and len(completion) <= task.max_completion_tokens
    # the warm-start sequence is the chat transcript's own tokens, up to the end-of-turn token
    user = tok.decode(list(p.prompt)).split("\n")[1].removesuffix("<|im_end|>")
    rendered = tok.render([{"role": "user", "content": user}, {"role": "assistant", "content": p.target.decode()}])
    assert list(prompt) + completion == rendered.ids[:len(prompt) + len(completion)]
    # answers are decoded text up to the first EOS id; what follows it is not the answer
    assert task.decode(completion + tok.encode("999")) == p.target
    assert task.reward(p, task.decode(completion)) == 1.0
    assert task.reward(p, task.decode(tok.encode("1") + [tok.eos_ids[0]])) < 1.0
    held = task.heldout()
    assert all(isinstance(h.prompt, tuple) for h in held) and len(set(held)) == len(held)


def test_generation_stops_at_the_checkpoints_eos_ids(parallel, checkpoint):
    """A stop id above 255 ends a row; the byte stop (10) no longer does."""
    from precisionrt.models.hf.load import from_hf
    from rl.inference.rollout import generate

    model = from_hf(checkpoint, dtype="float32").eval()
    prompts = [(1, 2, 3, 4), (5, 6, 7)]
    free = generate(model, prompts, 6, 32, 0.0, 1.0, torch.Generator(), stop_ids=(511,))
    first = free[0].tokens[1]   # the greedy second token of row 0: make it a stop id
    stopped = generate(model, prompts, 6, 32, 0.0, 1.0, torch.Generator(), stop_ids=(first,))
    assert stopped[0].tokens == free[0].tokens[:stopped[0].tokens.index(first) + 1] and stopped[0].stopped
    assert free[1].tokens[:len(stopped[1].tokens)] == stopped[1].tokens


# ----------------------------------------------------------------------------------- the RL command

def _rl(tmp_path, checkpoint, *sets):
    from precisionrt.config import load_config
    from rl.train import RLConfig, train

    tiny = ["train.steps=3", "train.eval_every=3", "train.log_every=1", "rl.prompts_per_step=4", "rl.group_size=4",
            "task.heldout_size=16", "train.warm_start_batch=16", f'run.dir="{tmp_path / "run"}"']
    model = [f'model.hf_path="{checkpoint}"', 'model.hf_init=""', "model.num_layers=4", "model.hidden_size=128",
             "model.num_query_groups=0", "model.ffn_hidden_size=256", "model.vocab_size=256",
             'model.tokenizer_path=""']   # back to the defaults: the checkpoint decides them
    return train(load_config(RLConfig, HF_CONFIG, tiny + model + list(sets)))


def test_committed_hf_config_runs_in_fp8_and_exports(tmp_path):
    """The config as committed (hf_init Qwen3, FP8 rollout, dynamic precision), shortened: rewards come from
    decoded answers, the export loads in transformers and holds the trained weights."""
    from transformers import AutoModelForCausalLM

    from precisionrt.config import load_config
    from rl.train import RLConfig, train

    s = train(load_config(RLConfig, HF_CONFIG, [
        "train.steps=2", "train.warm_start_steps=2", "train.eval_every=2", "train.log_every=1",
        "rl.prompts_per_step=2", "rl.group_size=2", "task.heldout_size=4", "train.warm_start_batch=4",
        f'run.dir="{tmp_path / "run"}"']))
    assert s["samples"]["trained"] == 8 and s["fp8_flop_fraction"] > 0.5
    export = Path(s["hf_export"])
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    assert json.loads((export / "config.json").read_text())["model_type"] == "qwen3"
    assert (export / "tokenizer.json").read_bytes() == (TOKENIZER / "tokenizer.json").read_bytes()
    final = torch.load(tmp_path / "run" / "checkpoints" / "step_000002.pt", weights_only=True)["model"]
    assert torch.equal(hf.model.embed_tokens.weight, final["embedding.word_embeddings.weight"])
    assert torch.equal(hf.model.layers[1].mlp.down_proj.weight, final["decoder.layers.1.mlp.linear_fc2.weight"]), \
        "the export is the policy at the end of RL"


def test_exported_rl_policy_generates_our_greedy_tokens_in_transformers(tmp_path, checkpoint):
    """After a warm start that makes the policy confident and a few RL steps, the HF export and our engine
    (both BF16: transformers' bf16 model, our BF16 layers with bf16 parameters) decode the held-out prompts
    greedily. Every token is the same, except where transformers' top-2 logit margin is within bf16's logit
    error (a near-tie either library may break either way): such prompts are counted, and must be few. Reached:
    16 of 16 prompts identical, log-probabilities of the chosen tokens within 3.6e-4."""
    from transformers import AutoModelForCausalLM

    from precisionrt.models.hf.load import from_hf
    from rl.envs import TaskConfig, make_task
    from rl.envs.chat import wrap
    from rl.inference.rollout import generate

    s = _rl(tmp_path, checkpoint, "train.warm_start_steps=150", "train.warm_start_lr=3e-3",
            'precision.mode="bf16"', 'rollout.precision="bf16"', 'task.name="reverse_digits"',
            "task.min_digits=3", "task.max_digits=4")
    assert s["reward_final"] > 0.5, s["reward_final"]   # confident enough that greedy decoding means something
    export = Path(s["hf_export"])
    tok = _tok()
    task = wrap(make_task(TaskConfig(name="reverse_digits", min_digits=3, max_digits=4, heldout_size=16)), tok)
    prompts = [p.prompt for p in task.heldout()]
    ours = generate(from_hf(export, dtype="bfloat16").eval(), prompts, task.max_completion_tokens, 32, 0.0, 1.0,
                    torch.Generator(), stop_ids=tok.eos_ids)   # one left-padded batch, as the engine decodes
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16).eval()
    same, ties, worst = 0, 0, 0.0
    for prompt, comp in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=task.max_completion_tokens,
                              eos_token_id=list(tok.eos_ids), pad_token_id=0, output_scores=True,
                              return_dict_in_generate=True)
        theirs = out.sequences[0, len(prompt):].tolist()
        if theirs == comp.tokens:
            same += 1
            logp = [torch.log_softmax(sc[0].float(), -1)[t] for sc, t in zip(out.scores, theirs)]
            worst = max(worst, max(abs(float(a) - b) for a, b in zip(logp, comp.logp_infer)))
            continue
        first = next(i for i, (a, b) in enumerate(zip(theirs + [-1], comp.tokens + [-2])) if a != b)
        top2 = out.scores[first][0].float().topk(2).values
        assert top2[0] - top2[1] < 0.1, (prompt, theirs, comp.tokens, top2)   # a real disagreement: fail
        ties += 1
    assert same >= 0.75 * len(prompts) and same + ties == len(prompts), (same, ties)
    # and the same log-probabilities of those tokens: 3.6e-4 reached; pad keys left visible in our left-padded
    # batch (the padding mask dropped) give 2.7e-3 with the same greedy tokens
    assert worst <= 1.5e-3, worst


def test_lm_command_trains_a_checkpoint_on_its_tokenizers_ids(tmp_path, checkpoint, monkeypatch):
    """``precisionrt.train`` with ``model.hf_path``: the corpus is tokenized by the checkpoint's tokenizer (fewer
    tokens than bytes), the model starts from the checkpoint's weights (its first eval loss is theirs) and
    trains; a TP size that the checkpoint's heads do not divide is refused before anything is built."""
    from precisionrt.config import ConfigError, load_config
    from precisionrt.train import LMConfig, check_config, train

    sets = [f'model.hf_path="{checkpoint}"', "model.seq_length=32", "train.steps=6", "train.eval_every=3",
            "train.log_every=3", "train.eval_batches=2", "train.batch_size=4", "data.max_bytes=200000",
            'precision.mode="bf16"', f'run.dir="{tmp_path / "lm"}"']
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
        sets.append(f"model.{key}={getattr(load_config(LMConfig, None, []).model, key)}")
    s = train(load_config(LMConfig, ROOT / "configs" / "lm_tiny_cpu.toml", sets + ["train.export_hf=true"]))
    assert s["corpus_tokens"] < 0.7 * s["corpus_bytes"], "BPE ids, not bytes"
    evals = [json.loads(line) for line in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["eval/loss"] for r in evals if "eval/loss" in r]
    assert losses[-1] < losses[0] < 7.0, losses   # the random checkpoint starts near log(512) = 6.24
    from transformers import AutoModelForCausalLM   # the export: the trained weights, loadable

    exported = AutoModelForCausalLM.from_pretrained(s["hf_export"], dtype=torch.float32)
    final = torch.load(tmp_path / "lm" / "checkpoints" / "step_000006.pt", weights_only=True)["model"]
    assert torch.equal(exported.model.layers[0].self_attn.o_proj.weight,
                       final["decoder.layers.0.self_attention.linear_proj.weight"])
    monkeypatch.setenv("WORLD_SIZE", "3")   # TP 3 divides the world; the checkpoint's 4 heads refuse it
    with pytest.raises(ConfigError, match=r"tensor_model_parallel_size \(3\) must divide model.num_attention_heads"):
        check_config(load_config(LMConfig, ROOT / "configs" / "lm_tiny_cpu.toml",
                                 sets[:1] + sets[-5:] + ["parallel.tensor_model_parallel_size=3"]))


def test_gpu_config_for_a_released_qwen_passes_preflight(checkpoint, tmp_path):
    """``configs/lm_qwen_gpu.toml`` with a checkpoint in place of the user's (and the CPU in place of the GPU):
    every key is valid and the pre-flight reads the checkpoint's dimensions."""
    from precisionrt.config import load_config
    from precisionrt.train import LMConfig, check_config

    cfg = load_config(LMConfig, ROOT / "configs" / "lm_qwen_gpu.toml",
                      [f'model.hf_path="{checkpoint}"', 'run.device="cpu"', f'run.dir="{tmp_path / "lm"}"'])
    check_config(cfg)
    assert cfg.train.export_hf and cfg.model.dims().vocab_size == 512


# ----------------------------------------------------------------------------------- the agent in chat

def _episode_messages():
    return [{"role": "user", "content": "Q:12+34"}, {"role": "assistant", "content": "C12+34"},
            {"role": "tool", "content": "E:malformed call"}, {"role": "assistant", "content": "C:12+34"},
            {"role": "tool", "content": "R:46"}, {"role": "assistant", "content": "A:46"}]


def test_agent_turns_are_the_chat_transcript_turn_by_turn():
    """An episode made turn by turn (prompt, generated action + EOS, observation) is, as text, exactly the chat
    template's rendering of its messages; each action's text is what the environment parses."""
    from rl.envs.chat import ChatTurns

    tok = _tok()
    turns = ChatTurns(tok)
    msgs = _episode_messages()
    ids = list(turns.prompt(b"Q:12+34\n"))
    for m in msgs[1:]:
        text = (m["content"] + "\n").encode()
        part = turns.action(text) if m["role"] == "assistant" else turns.observation(text)
        if m["role"] == "assistant":
            assert turns.action_text(part + tok.encode("junk")) == m["content"].encode()
        ids += part
    assert tok.decode(ids) == tok.chat_text(msgs)[:len(tok.decode(ids))]
    assert tok.chat_text(msgs).startswith(tok.decode(ids)) and tok.chat_text(msgs).endswith("<|im_end|>\n")
    assert tok.decode(turns.observation(b"R:46\n")) == "\n<|im_start|>tool\nR:46<|im_end|>\n<|im_start|>assistant\n"


def test_agent_error_mask_in_chat_is_exactly_the_failed_assistant_turn():
    """GLM-5 error masking on a chat demonstration: the untrained action tokens are exactly the malformed call
    and its EOS; the recovery call and the answer (each with its EOS) are trained; no template token of the
    tool's turns is."""
    from rl.workers.agent import tokenized
    from rl.envs.agent import Segment, Transcript
    from rl.envs.chat import ChatTurns

    tok = _tok()
    byte_demo = Transcript([Segment("prompt", list(b"Q:12+34\n")),
                            Segment("action", list(b"C12+34\n"), error="malformed"),
                            Segment("observation", list(b"E:malformed call\n")),
                            Segment("action", list(b"C:12+34\n")), Segment("observation", list(b"R:46\n")),
                            Segment("action", list(b"A:46\n"))])
    t = tokenized(byte_demo, ChatTurns(tok))
    ids = t.tokens

    def trained(error_masking):
        return tok.decode([i for i, m in zip(ids, t.loss_mask(error_masking)) if m])

    assert trained(True) == "C:12+34<|im_end|>A:46<|im_end|>"
    assert trained(False) == "C12+34<|im_end|>C:12+34<|im_end|>A:46<|im_end|>"


def test_calculator_episode_in_chat_is_the_rendered_conversation():
    """The episode loop with the real calculator and its tool, a policy that writes the right call and answer
    as chat tokens (the plumbing under test, not the model): the environment parses the decoded actions, its
    results come back as tool messages, and the transcript is the chat template's rendering of the
    conversation, token for token as the engine saw it."""
    import asyncio

    from rl.workers.agent import DecodeBatcher, run_episode
    from rl.envs import TaskConfig
    from rl.envs.calculator import CalculatorEnv, EnvConfig, ToolConfig
    from rl.envs.chat import ChatTurns
    from rl.inference.decode import Completion

    tok = _tok()
    turns = ChatTurns(tok)
    env = CalculatorEnv(TaskConfig(name="calculator", min_digits=2, max_digits=2, heldout_size=4),
                        EnvConfig(tool=ToolConfig(delay_median=0.0, failure_rate=0.0, hang_rate=0.0)))
    episode = env.heldout()[0]

    def policy(prompts, keys):
        out = []
        for p in prompts:
            seen = tok.decode(list(p))
            last = seen.rsplit("<|im_start|>", 2)[-2]   # the turn before the generation prompt
            text = f"C:{episode.a}{episode.op}{episode.b}" if last.startswith("user") else \
                "A:" + last.split("R:")[1].split("<|im_end|>")[0]
            tokens = tok.encode(text) + [tok.eos_ids[0]]
            out.append(Completion(tuple(p), tokens, [0.0] * len(tokens), 0, stopped=True))
        return out

    async def one():
        return await run_episode(env, episode, DecodeBatcher(policy), 14, 160, turns=turns)
    result = asyncio.run(one())
    assert result.reward == 1.0 and episode.answer == str(episode.result).encode()
    q = f"Q:{episode.a}{episode.op}{episode.b}"
    conversation = [{"role": "user", "content": q}, {"role": "assistant", "content": "C:" + q[2:]},
                    {"role": "tool", "content": f"R:{episode.result}"},
                    {"role": "assistant", "content": f"A:{episode.result}"}]
    assert tok.decode(result.transcript.tokens) == tok.chat_text(conversation).removesuffix("\n")
    kinds = [s.kind for s in result.transcript.segments]
    assert kinds == ["prompt", "action", "observation", "action"]


def test_calculator_agent_runs_on_a_qwen3_in_chat(tmp_path):
    """The multi-turn RL command on a Hugging Face architecture and tokenizer: episodes run, error masking
    counts chat tokens, the held-out evaluation decodes to <|im_end|> (a short warm start; learning the task
    takes the run of docs/huggingface.md, "The main job's task on a tiny Qwen3")."""
    from precisionrt.config import load_config
    from rl.train import RLConfig, train

    s = train(load_config(RLConfig, ROOT / "configs" / "rl_agent_cpu.toml", [
        'model.hf_init="qwen3"', "model.num_query_groups=2", "model.vocab_size=512", "model.seq_length=160",
        f'model.tokenizer_path="{TOKENIZER}"', 'precision.mode="bf16"', 'rollout.precision="bf16"',
        "train.steps=2", "train.warm_start_steps=20", "train.warm_start_batch=16", "train.eval_every=2",
        "train.log_every=1", "rl.prompts_per_step=2", "rl.group_size=2", "task.heldout_size=4",
        'executor.mode="sync"', "env.tool.delay_median=0.0", f'run.dir="{tmp_path / "run"}"']))
    assert s["samples"]["trained"] == 8 and s["agent"]["episodes"] == 4 * 2, (s["samples"], s["agent"])
    assert s["agent"]["error_masked_tokens"] >= s["agent"]["error_turns"] > 0, s["agent"]
