"""Tokenizers behind one interface (``precisionrt.models.tokenizer``): bytes, and a BPE trained here on local text
(``tokenizers``, seconds, offline) with a chat template; message masks from the transcript's own tokens."""

import json
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from precisionrt.models.tokenizer import CHATML  # noqa: E402

# No special tokens between turns: BPE merges can (and, trained on such text, do) cross message boundaries.
PLAIN = ("{% for m in messages %}{{ m.role }}:{{ m.content }}{% endfor %}"
         "{% if add_generation_prompt %}assistant:{% endif %}")


def train_bpe(path, template, texts, vocab_size=400, split_words=True):
    """A byte-level BPE trained on ``texts``, saved with ``template`` as a transformers tokenizer directory
    (``split_words=False``: merges may cross words and turns)."""
    from precisionrt.models.tokenizer import train_bpe as train

    return Path(train(path, texts, vocab_size=vocab_size, chat_template=template,
                      split="gpt2" if split_words else "none"))


def test_byte_tokenizer_round_trips_utf8():
    from precisionrt.models.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    text = "12+34=46\n é"
    assert tok.encode(text) == list(text.encode()) and tok.decode(tok.encode(text)) == text
    assert tok.eos_ids == (10,) and tok.vocab_size == 256


def test_hf_tokenizer_reads_eos_ids_from_generation_config(tmp_path):
    from precisionrt.models.tokenizer import HFTokenizer

    path = train_bpe(tmp_path / "tok", CHATML, ["what is 12+34? 46"] * 50)
    (path / "generation_config.json").unlink()
    tok = HFTokenizer(path)
    im_end = tok.tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_ids == (im_end,), "without generation_config.json: the tokenizer's eos_token"
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, 2]}))
    assert HFTokenizer(path).eos_ids == (im_end, 2)
    assert tok.decode(tok.encode("what is 12+34?")) == "what is 12+34?"


def test_assistant_turn_owns_its_end_of_turn_token_not_its_header(tmp_path):
    from precisionrt.models.tokenizer import HFTokenizer

    tok = HFTokenizer(train_bpe(tmp_path / "tok", CHATML, ["what is 12+34? 46"] * 50))
    messages = [{"role": "user", "content": "what is 12+34?"}, {"role": "assistant", "content": "46"}]
    rendered = tok.render(messages)
    trained = [i for i, m in zip(rendered.ids, rendered.mask([False, True])) if m]
    assert tok.decode(trained) == "46<|im_end|>\n", "the model learns to stop, not to write the role header"
    prompt = tok.render(messages[:1], add_generation_prompt=True).ids
    assert rendered.ids[: len(prompt)] == prompt, "the prompt the engine generated from is the transcript's prefix"


def _transcript(a: int, b: int) -> list[str]:
    return [f"user:add {a} and {b}", f"assistant:call add({a},{b}", "tool:error: bad args",
            f"assistant:call add({a}, {b})", f"tool:{a + b}", f"assistant:{a + b}"]


def test_error_mask_covers_exactly_the_failed_turn_when_tokens_straddle_boundaries(tmp_path):
    """GLM-5 error masking on a crafted transcript: the failed tool call (message 1) and the tool's error
    (message 2) give no gradient, the recovery (3) and the answer (5) do. The BPE is trained on transcripts
    whose turns run into each other, words not pre-split, so its tokens cross message boundaries (e.g.
    ``"tool:error: bad argsassistant:call add("``). Such a token is trained by nobody."""
    import random

    from precisionrt.models.tokenizer import HFTokenizer

    rng = random.Random(0)
    corpus = ["".join(_transcript(rng.randrange(100), rng.randrange(100))) for _ in range(300)]
    tok = HFTokenizer(train_bpe(tmp_path / "tok", PLAIN, corpus, vocab_size=350, split_words=False))
    messages = [dict(zip(("role", "content"), t.split(":", 1))) for t in _transcript(2, 3)]
    rendered = tok.render(messages)
    text = tok.tok.apply_chat_template(messages, tokenize=False)
    offsets = tok.tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert rendered.ids == tok.encode(text)
    assert any(o < 0 and "error" in text[a:b] and "call" in text[a:b]
               for (a, b), o in zip(offsets, rendered.owner)), "a token crosses from the error into the recovery"

    trained = [m["role"] == "assistant" and i != 1 for i, m in enumerate(messages)]
    mask = rendered.mask(trained)
    masked_turns = [(text.index("call add(2,3"), text.index("tool:5") - len("assistant:call add(2, 3)"))]
    for (a, b), m in zip(offsets, mask):
        if m:   # a trained token lies inside a trained turn: the recovery or the answer
            assert text[a:b] in "call add(2, 3)" or text[a:b] in "5", text[a:b]
            assert not any(a < hi and lo < b for lo, hi in masked_turns), text[a:b]
    assert sum(mask) >= 2, "the recovery and the answer are trained"
    # the check can fail: owning a token by the message it ends in trains the tool's error text
    spans = tok_spans(tok, messages)
    by_last_char = [next(i for i, (_, hi) in enumerate(spans) if b <= hi) for a, b in offsets]
    leaked = [text[a:b] for (a, b), o in zip(offsets, by_last_char) if trained[o] and "error" in text[a:b]]
    assert leaked, "a naive owner rule would train the error"


def tok_spans(tok, messages):
    from precisionrt.models.tokenizer import message_spans

    return message_spans(tok.template, messages, False)[1]


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    from precisionrt.models.tokenizer import HFTokenizer

    # drops every assistant turn but the last, as reasoning templates do with earlier thoughts
    rewriting = ("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}<|im_start|>{{ m.role }}\n"
                 "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}")
    tok = HFTokenizer(train_bpe(tmp_path / "tok", rewriting, ["hello there"] * 20))
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    with pytest.raises(ValueError, match="message 2 .user.: the chat template renders the transcript before it"):
        tok.render(messages)
