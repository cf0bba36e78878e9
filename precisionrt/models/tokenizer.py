"""Tokenizers behind one interface: bytes for the byte-level models, a Hugging Face tokenizer for real ones.

``Tokenizer`` is what the trainers and environments need: ``encode``/``decode``, the ids that end a
generation (``eos_ids``, from the checkpoint's ``generation_config.json`` as transformers reads it) and, for
chat, ``render(messages)``: the transcript as token ids with, per token, the index of the message it belongs
to. Loss masks and GLM-5 error masks come from those indices, never from re-tokenising a message alone (which
a BPE merge across the boundary would make disagree with the transcript).

A token whose characters cross a message boundary (a BPE merge of the end of one turn with the start of the
next) belongs to *no* message (index -1): it is masked out, whatever either message's mask says, so a trained
token never carries characters of a masked turn. An assistant message owns the text it generates, its
end-of-turn token included; the role header before it is the prompt's.

Where it is used: ``model.tokenizer_path`` (or an ``hf_path`` checkpoint's own files) selects it; the LM command
tokenizes its corpus with it, and the RL command's tasks speak through its chat template (``rl.envs.chat``:
single-turn prompts, and the calculator agent's turns as user, assistant and tool messages), stopping at
``eos_ids``. ``train_bpe`` makes a tokenizer directory offline (``tools/make_tokenizer.py``, the tests).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Protocol

from precisionrt.files import inside, read_json, read_json_or, regular_file
from precisionrt.models.chat_template import ChatTemplate


class Tokenizer(Protocol):
    vocab_size: int
    eos_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Rendered:
    """A chat transcript as tokens: ``owner[i]`` is the message index token ``i`` lies within (-1: template
    text between messages, or a token that crosses a message boundary)."""

    ids: list[int]
    owner: list[int]

    def mask(self, trained: list[bool]) -> list[int]:
        """Per token, 1 where its message is trained (``trained[message index]``), else 0."""
        return [int(o >= 0 and trained[o]) for o in self.owner]


BYTE_STOP = ord("\n")
"""The byte-level models' stop token: a newline ends a generation (their tasks' answers end with it too)."""


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; a newline ends a generation (``BYTE_STOP``)."""

    vocab_size = 256
    eos_ids = (BYTE_STOP,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A checkpoint directory's tokenizer (``transformers.AutoTokenizer``, local files only) and its chat
    template."""

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        self.path = os.fspath(path)
        check_tokenizer_files(self.path)   # before transformers opens any of them
        try:
            self.tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as e:   # transformers and tokenizers raise many types for a damaged file: one line each
            raise ValueError(f"{self.path}: no usable tokenizer ({type(e).__name__}: {e})") from None
        if not getattr(self.tok, "is_fast", False):
            raise ValueError(f"{self.path}: a fast tokenizer (tokenizer.json) is needed for message offsets")
        self.vocab_size = len(self.tok)
        self.eos_ids = eos_ids(self.path, self.tok)
        self._template = None

    @property
    def template(self) -> ChatTemplate:
        """The chat template (``tokenizer_config.json``'s, or ``chat_template.jinja``), compiled on first use;
        rendered under a budget (``precisionrt.models.chat_template``)."""
        if self._template is None:
            source = self.tok.chat_template
            if source is None:
                raise ValueError(f"{self.path}: the tokenizer has no chat template")
            if isinstance(source, dict):   # several named templates: transformers renders "default"
                source = source.get("default")
            self._template = ChatTemplate(source, f"{self.path}: chat template", _specials(self.tok))
        return self._template

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """``messages`` rendered by the chat template, as text."""
        return self.template.render(messages, add_generation_prompt)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        text, spans = message_spans(self.template, messages, add_generation_prompt)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return Rendered(enc["input_ids"], [_owner(a, b, spans) for a, b in enc["offset_mapping"]])


def load_tokenizer(model) -> Tokenizer:
    """The tokenizer of a ``precisionrt.models.gpt.ModelConfig``: ``model.tokenizer_path``, else the checkpoint's
    (``model.hf_path``), else bytes."""
    path = model.tokenizer_path or model.hf_path
    return HFTokenizer(path) if path else ByteTokenizer()


def check_tokenizer(model) -> Tokenizer:
    """``load_tokenizer``, with a ``ConfigError`` naming the key for a directory without a usable tokenizer, or
    a tokenizer whose vocabulary the model cannot embed."""
    from precisionrt.config import ConfigError

    key = "model.tokenizer_path" if model.tokenizer_path else "model.hf_path"
    try:
        tok = load_tokenizer(model)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{key}: {e}") from None
    vocab = model.dims().vocab_size
    if tok.vocab_size > vocab:
        where = f"{key} {model.tokenizer_path or model.hf_path!r}" if isinstance(tok, HFTokenizer) else "bytes"
        raise ConfigError(f"model.vocab_size: the tokenizer ({where}) has {tok.vocab_size} tokens, more than the "
                          f"model's vocabulary of {vocab}")
    return tok


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""The ChatML template of the Qwen family, without its tool and reasoning branches."""
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split: digits one by one, words with their leading space, punctuation runs, newlines.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def train_bpe(out_dir: str | os.PathLike, texts, *, vocab_size: int, chat_template: str = CHATML,
              split: str = "qwen2", specials=CHATML_SPECIALS, eos: str = "<|im_end|>", pad: str = "<|endoftext|>"
              ) -> str:
    """Train a byte-level BPE on ``texts`` (offline, seconds) and save it as a transformers tokenizer directory
    with ``chat_template``, ``eos`` in generation_config.json and ``pad`` as padding. ``split``: ``"qwen2"``
    (Qwen2's pre-tokenizer: single digits), ``"gpt2"`` (ByteLevel's own regex) or ``"none"`` (merges may cross
    words and message boundaries)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    tok = RawTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split == "gpt2")
    if split == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"), byte_level])
    elif split in ("gpt2", "none"):
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"split {split!r}: one of 'qwen2', 'gpt2', 'none'")
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad)
    fast.chat_template = chat_template
    out = os.fspath(out_dir)
    fast.save_pretrained(out)
    with open(os.path.join(out, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": [fast.convert_tokens_to_ids(eos)]}, f, indent=2)
        f.write("\n")
    return out


def message_spans(template: ChatTemplate, messages: list[dict], add_generation_prompt: bool
                  ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered transcript and each message's character span ``[start, end)``.

    An assistant message's span is what the model generates: the transcript rendered through it, minus the
    transcript before it rendered with the generation prompt (so the role header is the prompt's, and the
    end-of-turn token is the message's: training it teaches the model to stop). Any other message spans from
    the end of the transcript before it to the end of its own rendering. A template under which a shorter
    transcript does not render as a prefix of a longer one (one that rewrites earlier turns) is an error naming
    the message: its tokens could not be attributed exactly."""
    def render(msgs, gen=False):
        return template.render(msgs, gen) if msgs else ""

    spans = []
    for i, m in enumerate(messages):
        before = render(messages[:i], gen=m.get("role") == "assistant")
        through = render(messages[: i + 1])
        if not through.startswith(before):
            raise ValueError(f"message {i} ({m.get('role')}): the chat template renders the transcript before "
                             "it differently once it follows, so its tokens cannot be attributed")
        spans.append((len(before), len(through)))
    text = render(messages, gen=add_generation_prompt)
    if not text.startswith(render(messages)):
        raise ValueError("the generation prompt is not appended to the transcript")
    return text, spans


def _owner(start: int, end: int, spans: list[tuple[int, int]]) -> int:
    for i, (a, b) in enumerate(spans):
        if a <= start and end <= b and end > start:
            return i
    return -1


def eos_ids(path: str, tok) -> tuple[int, ...]:
    """The ids that end a generation: ``generation_config.json``'s ``eos_token_id`` (an id or a list), else the
    tokenizer's ``eos_token``; each an id of the vocabulary."""
    gen = os.path.join(path, "generation_config.json")
    value, where = None, f"{path}: the tokenizer's eos_token"
    if os.path.lexists(gen):
        try:
            config = read_json(gen, "a generation config", limit=16 << 20)
        except (OSError, ValueError) as e:
            raise ValueError(f"{gen}: unreadable ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{gen}: not a JSON object")
        value, where = config.get("eos_token_id"), f"{gen}: eos_token_id"
    if value is None:
        value = tok.eos_token_id
        if value is None:
            raise ValueError(f"{path}: neither generation_config.json nor the tokenizer names an EOS token")
    ids = value if isinstance(value, list) else [value]
    vocab = len(tok)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
        raise ValueError(f"{where} = {value!r}: must be a token id or a non-empty list of them, each in [0, {vocab})")
    return tuple(ids)


def check_tokenizer_files(path: str) -> None:
    """Refuse a tokenizer directory whose files would hang, leak or mislead before anything reads them: no
    directory, no ``tokenizer.json`` (transformers would make up a tokenizer of a few tokens), a file that is
    no regular file (a FIFO blocks the read), or a symlink out of the directory (a hub snapshot's blobs
    excepted)."""
    from precisionrt.models.hf.names import TOKENIZER_FILES, hub_roots

    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a directory")
    for name in TOKENIZER_FILES:
        full = os.path.join(path, name)
        if not os.path.lexists(full):
            continue
        try:   # UnsafeFile (a symlink out, not a regular file) is a ValueError naming the file
            inside(path, name, "the tokenizer file", hub_roots(path))
            regular_file(full, "a tokenizer file")
            # transformers reads these as JSON objects and fails deep inside (a KeyError, an AttributeError)
            # on anything else: the file is named here instead
            content = read_json_or(ValueError, full, "a tokenizer file") if name.endswith(".json") else None
        except OSError as e:   # gone since it was listed, or cannot be looked at
            raise ValueError(f"{full}: cannot be read ({e.strerror or e})") from None
        if name.endswith(".json") and name != "vocab.json" and not isinstance(content, dict):
            raise ValueError(f"{full}: not a JSON object")
        if name == "tokenizer.json" and not isinstance(content.get("model"), dict):
            raise ValueError(f"{full}: not a tokenizers file (no \"model\" object)")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise ValueError(f"{path}: no tokenizer.json (a fast tokenizer is needed; transformers would make up one "
                         "of a few tokens)")


def _specials(tok) -> dict:
    """The special tokens a template sees by name (``bos_token``, ``eos_token``, ...), as transformers passes them."""
    return {k: v if isinstance(v, list) else str(v) for k, v in tok.special_tokens_map.items() if v is not None}
