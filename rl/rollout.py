"""Rollout engine: samples completions from its own copy of the Megatron GPT policy, with the behaviour
log-probabilities (``logp_infer``) and the policy version that produced them.

The copy is refreshed by versioned weight sync from the trainer (``load_weights``), with the trainer's
versioned precision map (``set_precisions``). Its precision is set by ``rollout.precision``: ``"fp8"`` runs
every FP8-capable GEMM in FP8 (current scaling, as FP8 inference engines do), which makes a real
train/inference mismatch for IcePop to correct; ``"follow"`` runs each layer as the trainer does; a layer
promoted on the rollout side for its mismatch runs BF16 in every mode (``rollout_precisions``).

Decoding is batched: all prompts decode together, left-padded to one length. Without a KV cache each new token
re-runs the whole sequence; with ``rollout.kv_cache`` each prompt is encoded once and every later step runs one token
(``tools/bench_rollout.py`` measures tokens per second both ways).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from precisionrt.config import Checked, Range, Text
from precisionrt.fp8 import ScalingConfig
from precisionrt.linear import LayerNumerics, precision_layers
from precisionrt.megatron import KVCache, ModelConfig, SDPACoreAttention, build_gpt
from precisionrt.syncs import to_device
from precisionrt.tokenizer import load_tokenizer
from rl import attribution

STOP = ord("\n")
CHANNEL_SCALE = "channel_scale"   # published beside the weights: an injected fault's input-channel scaling


@dataclass
class RolloutConfig(Checked):
    precision: Literal["fp8", "bf16", "follow"] = "fp8"
    """The rollout copy's GEMMs: every FP8-capable layer in ``fp8`` or all in ``bf16``, or ``follow``: each layer
    in the precision the trainer runs it in, from the versioned precision map published with the weights."""
    temperature: Annotated[float, Range(ge=0, le=100)] = 1.0
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    kv_cache: bool = False
    """Decode incrementally with a KV cache (each prompt encoded once, then one token per step) instead of
    recomputing the whole sequence at every step."""
    placement: Literal["colocated", "split"] = "colocated"
    """``colocated``: the rollout copy on the trainer's device (its own tensors: it shares nothing mutable with
    the trainer). ``split``: on another device: ``rollout.device`` for an engine in the trainer's process, or a
    Ray actor's own (``executor.kind = "ray"``, ``executor.num_gpus`` per actor; on a CPU machine, another
    process)."""
    device: Annotated[str, Text("auto, cpu, cuda or cuda:N", pattern=r"auto|cpu|cuda(:[0-9]{1,3})?")] = "auto"
    """``auto``: the trainer's device (colocated), the actor's (split, Ray). ``split`` in the trainer's process
    names another device here, e.g. ``"cuda:1"``."""
    sync_every: Annotated[int, Range(ge=1, le=2**16)] = 16
    """Decode steps between two looks from the host at whether every row has stopped: the only read from the
    device while decoding (on a GPU each is a synchronisation). A batch decodes up to ``sync_every - 1`` steps
    past its last stop; the samples are the same for any value."""



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


@contextmanager
def kv_caches(model):
    """Incremental decoding for the duration: every core attention keeps its keys and values."""
    modules = [m for m in model.modules() if isinstance(m, SDPACoreAttention)]
    if not modules:
        raise ValueError("rollout.kv_cache needs the model's core attention to be SDPACoreAttention")
    for m in modules:
        m.kv_cache = KVCache()
    try:
        yield
    finally:
        for m in modules:
            m.kv_cache = None


def _padding_mask(pad: torch.Tensor, sq: int, sk: int) -> torch.Tensor:
    """Megatron's attention mask (True = masked out, ``[b, 1, sq, sk]``) for left-padded rows whose queries are
    the last ``sq`` of ``sk`` positions: causal, and no real query sees a pad key. A pad query sees itself only,
    so that no row of the softmax is empty (an empty one is NaN, and NaN times a zero weight poisons the rest)."""
    q = torch.arange(sk - sq, sk, device=pad.device)[:, None]
    k = torch.arange(sk, device=pad.device)[None, :]
    real_key = k[None] >= pad[:, None, None]                      # [b, 1, sk]
    attend = (k <= q)[None] & (real_key | (k == q)[None])           # [b, sq, sk]
    return ~attend[:, None]


def check_fits(prompts: list[bytes], max_new_tokens: int, max_len: int) -> None:
    for p in prompts:
        if len(p) == 0 or len(p) + max_new_tokens > max_len:
            raise ValueError(f"prompt {p[:40]!r} has {len(p)} tokens; with {max_new_tokens} new tokens it must fit "
                             f"the context of {max_len} (and not be empty)")


@torch.no_grad()
def generate(model, prompts: list[Sequence[int]], max_new_tokens: int, max_len: int, temperature: float,
             top_p: float, generator: torch.Generator, version: int = -1, map_version: int = 0,
             kv_cache: bool = False, stop_ids: tuple[int, ...] = (STOP,), sync_every: int = 16) -> list[Completion]:
    """Batched sampling of token-id prompts (bytes are byte tokens) until every row produced one of ``stop_ids``
    or the budget ends; prompts longer than the context raise ValueError naming the prompt. ``kv_cache``:
    encode each prompt once and then only each new token, against the cached keys and values (without it,
    every step recomputes the whole sequence). Prompts of different lengths decode in one batch, left-padded
    (each row keeps its own positions; pad keys are masked); prompts of one length need no mask at all.

    Runs on the model's device (``generator`` must be on it too). Sampling, stop detection and the cache stay
    there: the host reads once every ``sync_every`` steps (have all rows stopped?) and once at the end."""
    was_training = model.training
    model.eval()
    check_fits(prompts, max_new_tokens, max_len)
    device = model_device(model)
    width = max(len(p) for p in prompts)
    padded = any(len(p) != width for p in prompts)
    seqs = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        seqs[i, width - len(p):] = torch.tensor(list(p))
    seqs = to_device(seqs, device)
    pad = to_device(torch.tensor([width - len(p) for p in prompts]), device)
    out = Decoded(len(prompts), max_new_tokens, stop_ids, device)

    def forward(tokens: torch.Tensor, first: int) -> torch.Tensor:
        """Logits of the last position, for ``tokens`` at positions ``first..`` of the padded rows."""
        positions = (torch.arange(first, first + tokens.shape[1], device=device)[None] - pad[:, None]).clamp(min=0)
        mask = _padding_mask(pad, tokens.shape[1], first + tokens.shape[1]) if padded else None
        return model(tokens, positions, mask).float()[:, -1]

    with kv_caches(model) if kv_cache else nullcontext():
        logits = forward(seqs, 0)
        for step in range(max_new_tokens):
            tok = out.take(logits, temperature, top_p, generator)
            if out.should_stop(step, max_new_tokens, sync_every):
                break
            seqs = torch.cat([seqs, tok[:, None]], dim=1)
            logits = forward(tok[:, None], seqs.shape[1] - 1) if kv_cache else forward(seqs, 0)
    model.train(was_training)
    return out.completions(prompts, version, map_version)


def rollout_precisions(mode: str, trainer: dict[str, str], rollout_bf16, fp8_capable: dict[str, bool]
                       ) -> dict[str, str]:
    """The precision the rollout copy runs each layer in: BF16 where it cannot run FP8, under ``mode = "bf16"``
    and for a layer promoted on the rollout side (``rollout_bf16``, ``rl.mismatch_policy``); otherwise FP8,
    or under ``mode = "follow"`` the trainer's precision (``trainer``). The engine and the trainer's switch log
    both use this one rule."""
    forced = set(rollout_bf16)

    def one(name: str) -> str:
        if mode == "bf16" or name in forced or not fp8_capable[name]:
            return "bf16"
        return trainer[name] if mode == "follow" else "fp8"
    return {name: one(name) for name in trainer}


class RolloutEngine:
    """A separate policy copy for generation, on ``device``, with its own precision and a weight version. It
    shares no tensor with the trainer: weights arrive by copy (``load_weights``)."""

    def __init__(self, model_cfg: ModelConfig, cfg: RolloutConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.device = torch.device(device)
        self.stop_ids = load_tokenizer(model_cfg).eos_ids
        self.model = build_gpt(model_cfg, load_weights=False, device=self.device)   # weights come by weight sync
        self.model.eval()
        for layer in precision_layers(self.model).values():
            # inference: every tensor scaled from its own amax, no statistics
            layer.numerics = LayerNumerics(ScalingConfig(recipe="current"), layer.weight.device)
            layer.numerics.collect = False
            layer.precision = "bf16" if cfg.precision == "bf16" or not layer.fp8_capable else "fp8"
        self.version = -1
        self.map_version = -1
        self.sessions: dict = {}   # key -> rl.sessions.Prefix: a multi-turn episode's cached keys and values
        self.reused_tokens = 0     # prompt tokens those caches spared from encoding

    def load_weights(self, state: dict, version: int) -> None:
        """``state``: the policy's state dict, plus ``<layer>.channel_scale`` for a layer under an injected
        channel scaling (absent: none)."""
        scales = {k[: -len(CHANNEL_SCALE) - 1]: v for k, v in state.items() if k.endswith("." + CHANNEL_SCALE)}
        self.model.load_state_dict({k: v for k, v in state.items() if not k.endswith("." + CHANNEL_SCALE)})
        for name, layer in precision_layers(self.model).items():
            scale = scales.get(name)
            layer.channel_scale = None if scale is None else scale.to(self.device)
        self.version = version
        self.sessions.clear()   # computed with the old weights

    def set_precisions(self, precisions: dict[str, str], map_version: int, rollout_bf16=()) -> None:
        """The trainer's per-layer precisions, version ``map_version``, and the layers promoted on the rollout
        side only: each layer runs as ``rollout_precisions`` says."""
        layers = precision_layers(self.model)
        if set(precisions) != set(layers) or not set(rollout_bf16) <= set(layers):
            missing = sorted(set(layers) - set(precisions))
            unknown = sorted((set(precisions) | set(rollout_bf16)) - set(layers))
            raise ValueError(f"precision map {map_version} does not name this model's layers: missing "
                             f"{missing[:3]}, unknown {unknown[:3]}")
        capable = {name: layer.fp8_capable for name, layer in layers.items()}
        for name, p in rollout_precisions(self.cfg.precision, precisions, rollout_bf16, capable).items():
            if layers[name].precision != p:
                self.sessions.clear()   # computed in the old precision
            layers[name].precision = p
        self.map_version = map_version

    def precisions(self) -> dict[str, str]:
        return {name: layer.precision for name, layer in precision_layers(self.model).items()}

    def score(self, sequences: list[list[int]], starts: list[int], bf16_layers: list[str]) -> list[list[float]]:
        """Log-probs, as ``generate`` scores them, of each sequence's tokens from ``starts[i]`` on, with the
        ``bf16_layers`` in BF16 for this call only (per-layer mismatch attribution, ``rl/attribution.py``)."""
        layers = precision_layers(self.model)
        unknown = [n for n in bf16_layers if n not in layers]
        if unknown:
            raise ValueError(f"score: unknown layers {unknown[:3]}")
        saved = {n: layers[n].precision for n in bf16_layers}
        try:
            for n in bf16_layers:
                layers[n].precision = "bf16"
            return attribution.score(self.model, sequences, starts, self.cfg.temperature or 1.0, logits_of)
        finally:
            for n, p in saved.items():
                layers[n].precision = p

    def close(self) -> None:
        """Nothing to release in-process (the Ray engine stops its actor here)."""

    def generate(self, prompts: list[Sequence[int]], max_new_tokens: int, generator: torch.Generator,
                 keys: list | None = None) -> list[Completion]:
        """Completions that end at the tokenizer's EOS ids (``model.tokenizer_path``; bytes: ``"\n"``).
        ``generator``: on the engine's ``device``. ``keys``: multi-turn episodes, one key per prompt; with
        ``rollout.kv_cache`` each keeps its keys and values across calls (``rl/sessions.py``), so a call encodes
        only what is new since the key's last call."""
        if keys is None or not self.cfg.kv_cache:
            return generate(self.model, prompts, max_new_tokens, self.model_cfg.seq_length, self.cfg.temperature,
                            self.cfg.top_p, generator, self.version, self.map_version, self.cfg.kv_cache,
                            self.stop_ids, self.cfg.sync_every)
        from rl.sessions import generate_continued
        check_fits(prompts, max_new_tokens, self.model_cfg.seq_length)
        comps, prefixes, reused = generate_continued(
            self.model, prompts, [self.sessions.get(k) for k in keys], max_new_tokens, self.cfg.temperature,
            self.cfg.top_p, generator, self.version, self.map_version, self.stop_ids, self.cfg.sync_every)
        self.sessions.update(zip(keys, prefixes))
        self.reused_tokens += reused
        return comps
