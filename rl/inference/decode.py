"""Decoding: sampling the next token, the batched decode loop every generator shares, and the attention mask of
left-padded rows.

A batch decodes on the model's device: tokens, log-probs, lengths and stop flags stay there (``Decoded``), and the
host reads once every ``sync_every`` steps (have all rows stopped?) and once at the end. ``generate``
(``rollout.py``, fresh prompts) and ``generate_continued`` (``sessions.py``, prompts that continue a cached
prefix) differ only in how they encode the prompt and feed the next token; both run ``decode``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from precisionrt.distributed.syncs import to_device
from rl.envs.task import STOP


@dataclass
class Completion:
    prompt: Sequence[int]      # the prompt's tokens (bytes for the byte-level models)
    tokens: list[int]          # generated tokens, the stop token included if it was produced
    logp_infer: list[float]    # log pi_infer of each generated token
    version: int
    stopped: bool              # produced a stop token within the budget
    map_version: int = 0       # the trainer's precision map the engine held when it generated this
    mask: list[int] | None = None
    """Multi-turn episodes: per token of ``tokens``, 1 where the loss trains it (observations and masked errors
    0); None: every token trains."""
    token_versions: list[int] | None = None
    """Multi-turn episodes: the policy version of each action token (-1 on observations); ``version`` is the
    oldest."""

    @property
    def trained_tokens(self) -> int:
        return len(self.tokens) if self.mask is None else sum(self.mask)

    @property
    def text(self) -> bytes:
        """Byte-level models' completion text, stop byte excluded (a task's ``decode`` for any tokenizer)."""
        return bytes(t for t in self.tokens if t != STOP)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None).float()   # [b, s, vocab]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (from the top-p nucleus when ``top_p < 1``; temperature 0: greedy) and their
    log-probabilities under the full softmax at ``temperature``: the distribution the trainer scores the same
    tokens with. Scoring them under the renormalised nucleus instead would put the kept mass (log of it, up to
    -log 0.9 per token at top_p 0.9) into every train/inference ratio, and IcePop would mask whole sequences
    for a difference of sampling rule, not of numerics."""
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        tok = logits.argmax(dim=-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    probs = logp.exp()
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
        probs = probs / probs.sum(-1, keepdim=True)
    tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


class Decoded:
    """What a batched decode made so far, kept on the model's device: each row's tokens and their log-probs, how
    many of them count (up to and including the row's first stop token, one of ``stop_ids``), which rows stopped.
    Nothing comes back to the host while decoding except ``finished`` (one read); ``rows`` brings everything in
    one transfer at the end. A stopped row goes on sampling with the batch, unkept: the batch decodes until a
    read finds every row stopped."""

    def __init__(self, rows: int, max_new_tokens: int, stop_ids: tuple[int, ...] = (STOP,),
                 device: torch.device | str = "cpu"):
        self.stop_ids = tuple(stop_ids)
        self._stop = to_device(torch.tensor(self.stop_ids), device)
        self.tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
        self.logp = torch.zeros(rows, max_new_tokens, device=device)
        self.length = torch.zeros(rows, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.steps = 0

    def take(self, logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
             ) -> torch.Tensor:
        """Sample the next token of every row; it counts for the rows not yet stopped. Returns the tokens."""
        tok, lp = sample_next(logits, temperature, top_p, generator)
        self.tokens[:, self.steps] = tok
        self.logp[:, self.steps] = lp
        self.length += ~self.done
        self.done |= torch.isin(tok, self._stop)
        self.steps += 1
        return tok

    def finished(self) -> bool:
        """Whether every row has stopped: one read from the device."""
        return bool(self.done.all())

    def rows(self) -> list[tuple[list[int], list[float]]]:
        """Each row's kept tokens and their log-probs, in one transfer (float64 holds both exactly)."""
        n = self.steps
        host = torch.cat([self.tokens[:, :n].double(), self.logp[:, :n].double(), self.length[:, None].double()],
                         dim=1).tolist()
        return [([int(t) for t in r[:int(r[-1])]], r[n:n + int(r[-1])]) for r in host]

    def completions(self, prompts: list[bytes], version: int, map_version: int) -> list[Completion]:
        return [Completion(p if isinstance(p, (bytes, tuple)) else tuple(p),   # immutable: a sample's identity
                           g, lp, version, stopped=any(t in self.stop_ids for t in g), map_version=map_version)
                for p, (g, lp) in zip(prompts, self.rows())]

    def should_stop(self, step: int, max_new_tokens: int, sync_every: int) -> bool:
        """After decode step ``step`` (from 0): the budget is spent, or (looked at every ``sync_every`` steps) every
        row has stopped."""
        return step == max_new_tokens - 1 or ((step + 1) % sync_every == 0 and self.finished())


def attention_mask(valid: torch.Tensor, sq: int) -> torch.Tensor:
    """Megatron's mask (True = masked out, ``[b, 1, sq, sk]``) for queries that are the last ``sq`` of the ``sk``
    key positions, where ``valid[b, k]`` says which keys are real: causal, no real query sees a pad key, and a
    pad query sees itself only (an empty softmax row is NaN, and NaN times a zero weight poisons the rest)."""
    sk = valid.shape[1]
    q = torch.arange(sk - sq, sk, device=valid.device)[:, None]
    k = torch.arange(sk, device=valid.device)[None, :]
    attend = (k <= q)[None] & (valid[:, None, :] | (k == q)[None])
    return ~attend[:, None]


def decode(first_logits: torch.Tensor, feed: Callable[[torch.Tensor], torch.Tensor], max_new_tokens: int,
           temperature: float, top_p: float, generator: torch.Generator, stop_ids: tuple[int, ...],
           sync_every: int) -> Decoded:
    """The decode loop: sample from ``first_logits`` (the last prompt position's, ``[b, vocab]``), then from
    ``feed(tokens)`` (the logits after appending ``tokens``, one per row) until every row stopped or the budget is
    spent; the host looks every ``sync_every`` steps."""
    out = Decoded(first_logits.shape[0], max_new_tokens, stop_ids, first_logits.device)
    logits = first_logits
    for step in range(max_new_tokens):
        tok = out.take(logits, temperature, top_p, generator)
        if out.should_stop(step, max_new_tokens, sync_every):
            break
        logits = feed(tok)
    return out


def check_fits(prompts: list[bytes], max_new_tokens: int, max_len: int) -> None:
    for p in prompts:
        if len(p) == 0 or len(p) + max_new_tokens > max_len:
            raise ValueError(f"prompt {p[:40]!r} has {len(p)} tokens; with {max_new_tokens} new tokens it must fit "
                             f"the context of {max_len} (and not be empty)")
