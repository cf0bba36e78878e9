"""Tasks spoken through a real tokenizer and its chat template: single-turn tasks (``ChatTask``) and the
turns of multi-turn episodes (``ChatTurns``).

The task itself stays text: a problem's prompt (``"472+391="``) and target (``"368"``) are its text, and its
reward scores the answer text. ``ChatTask`` puts that text where a chat model expects it:

* the prompt is the user message rendered by the tokenizer's chat template with the generation prompt
  (``<|im_start|>user\\n472+391=<|im_end|>\\n<|im_start|>assistant\\n`` under ChatML): the ids the policy
  generates from;
* generation stops at the checkpoint's EOS ids (``generation_config.json``), the answer is the decoded text
  before the first of them, and that text is what the reward scores;
* a warm-start example is the rendered prompt, then the answer's own tokens and the first EOS id: exactly the
  sequence the policy would generate, so the supervised start trains what RL samples.

Under the byte tokenizer a task needs none of this (``rl.envs.task.HeldOutTask``: bytes are the tokens and
``"\\n"`` ends a completion); ``wrap`` returns it unchanged and ``turns`` gives ``ByteTurns``, so byte-level
runs are what they were.
"""

from __future__ import annotations

import random

from precisionrt.models.tokenizer import ByteTokenizer, Tokenizer
from rl.envs.task import STOP, Problem, Task


class ChatTask:
    """``task`` (a ``HeldOutTask``) with prompts as chat-template token ids and answers decoded by ``tokenizer``.
    Its problems carry the prompt as a tuple of token ids and the target as text bytes."""

    def __init__(self, task: Task, tokenizer: Tokenizer):
        if not hasattr(tokenizer, "render"):
            raise ValueError(f"{type(tokenizer).__name__} has no chat template to render prompts with")
        self.task, self.tokenizer = task, tokenizer
        self._prompts: dict[bytes, tuple[int, ...]] = {}
        self._texts: dict[tuple[int, ...], bytes] = {}   # a rendered prompt's text, for demonstrations
        self.name = task.name
        self.stop_ids = tuple(tokenizer.eos_ids)
        # A prompt's content has at most one token per byte (a byte-level BPE token is one byte or more), and
        # the template adds what it adds around an empty message: a bound for every prompt of the task.
        self.max_prompt_tokens = len(self._render(b"")) + task.max_prompt_tokens
        self.max_completion_tokens = task.max_completion_tokens   # answer bytes + the stop, now one EOS id

    def _render(self, prompt: bytes) -> tuple[int, ...]:
        if prompt not in self._prompts:   # a task has a few thousand prompts; the template is slow Jinja
            messages = [{"role": "user", "content": prompt.decode("utf-8")}]
            self._prompts[prompt] = tuple(self.tokenizer.render(messages, add_generation_prompt=True).ids)
            self._texts[self._prompts[prompt]] = prompt
        return self._prompts[prompt]

    def _chat(self, problem: Problem) -> Problem:
        return Problem(self._render(problem.prompt), problem.target)

    def heldout(self) -> list[Problem]:
        return [self._chat(p) for p in self.task.heldout()]

    def sample(self, rng: random.Random) -> Problem:
        return self._chat(self.task.sample(rng))

    def decode(self, tokens: list[int]) -> bytes:
        """The answer text of a completion: its tokens before the first stop id, decoded."""
        return text_before_stop(self.tokenizer, tokens, self.stop_ids)

    def reward(self, problem: Problem, completion: bytes) -> float:
        return self.task.reward(problem, completion)

    def demonstration(self, problem: Problem, rng: random.Random) -> bytes:
        return self.task.demonstration(Problem(self._texts[problem.prompt], problem.target), rng)

    def format_example(self, problem: Problem, answer: bytes) -> tuple[tuple[int, ...], list[int]]:
        return problem.prompt, self.tokenizer.encode(answer.decode("utf-8")) + [self.stop_ids[0]]


def text_before_stop(tokenizer: Tokenizer, tokens: list[int], stop_ids: tuple[int, ...]) -> bytes:
    """What a generation says: its tokens before the first of ``stop_ids``, decoded (UTF-8 bytes)."""
    end = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return tokenizer.decode(list(tokens[:end])).encode("utf-8")


def wrap(task: Task, tokenizer: Tokenizer) -> Task:
    """``task`` as the policy's tokenizer speaks it: unchanged for bytes, a ``ChatTask`` otherwise."""
    return task if isinstance(tokenizer, ByteTokenizer) else ChatTask(task, tokenizer)


class ByteTurns:
    """A multi-turn episode's turns for the byte-level models: the environment's bytes are the tokens, and
    ``"\\n"`` ends an action."""

    stop_ids = (STOP,)
    overhead = 0   # tokens a turn adds around its text

    def prompt(self, text: bytes) -> list[int]:
        return list(text)

    def action(self, text: bytes) -> list[int]:
        """A demonstration's action (its text, stop excluded) as the tokens the policy generates."""
        return list(text) + [STOP]

    def action_text(self, tokens: list[int]) -> bytes:
        return bytes(t for t in tokens if t != STOP)

    def observation(self, text: bytes) -> list[int]:
        return list(text)


class ChatTurns:
    """A multi-turn episode as chat messages, rendered by ``tokenizer``'s template: the prompt is a user message
    (with the generation prompt), each action an assistant message (a tool call or the answer, ended by the
    EOS id it generates), each observation a ``tool`` message followed by the next generation prompt.

    The tokens of an episode are its turns' tokens in order, each turn encoded by itself: the engine generates
    an action after the context it was given and the environment appends the next turn's tokens, so a token
    never spans two turns and the loss masks of ``rl.envs.agent.Transcript`` (observations untrained, the
    policy's failed calls masked under error masking) fall on turn boundaries exactly. What the template puts
    between an assistant turn's EOS and the tool's text (``\\n<|im_start|>tool\\n`` under ChatML) is part of the
    observation. The line protocol's trailing newlines are dropped: messages delimit themselves."""

    def __init__(self, tokenizer: Tokenizer):
        if not hasattr(tokenizer, "render"):
            raise ValueError(f"{type(tokenizer).__name__} has no chat template to render turns with")
        self.tokenizer = tokenizer
        self.stop_ids = tuple(tokenizer.eos_ids)
        self._eos_text = tokenizer.decode([self.stop_ids[0]])
        self._before, self._after = self._tool_wrapping()
        self.overhead = max(len(self.prompt(b"")), len(self.observation(b""))) + 1   # + an action's EOS

    def _tool_wrapping(self) -> tuple[str, str]:
        """The template's text between an assistant turn's EOS and a tool message's content, and after the
        content up to the next generation prompt (probed with marker messages)."""
        user, reply, result = {"role": "user", "content": "Q"}, {"role": "assistant", "content": "C"}, "\x01R\x01"
        seen = self.tokenizer.chat_text([user], True) + "C" + self._eos_text
        full = self.tokenizer.chat_text([user, reply, {"role": "tool", "content": result}], True)
        if not full.startswith(seen) or full.count(result) != 1:
            raise ValueError("the chat template does not continue an assistant turn that ends with its EOS token "
                             "by a tool message: its turns cannot be generated one at a time")
        rest = full[len(seen):]
        return rest[:rest.index(result)], rest[rest.index(result) + len(result):]

    def prompt(self, text: bytes) -> tuple[int, ...]:
        content = text.decode("utf-8").removesuffix("\n")
        return tuple(self.tokenizer.render([{"role": "user", "content": content}], add_generation_prompt=True).ids)

    def action(self, text: bytes) -> list[int]:
        return self.tokenizer.encode(text.decode("utf-8").removesuffix("\n")) + [self.stop_ids[0]]

    def action_text(self, tokens: list[int]) -> bytes:
        return text_before_stop(self.tokenizer, tokens, self.stop_ids)

    def observation(self, text: bytes) -> list[int]:
        return self.tokenizer.encode(self._before + text.decode("utf-8").removesuffix("\n") + self._after)


def turns(tokenizer: Tokenizer) -> ByteTurns | ChatTurns:
    """How a multi-turn episode's turns become tokens under the policy's tokenizer."""
    return ByteTurns() if isinstance(tokenizer, ByteTokenizer) else ChatTurns(tokenizer)
