"""Rollout engine: samples completions from its own copy of the Megatron GPT policy, with the behaviour
log-probabilities (``logp_infer``) and the policy version that produced them.

The copy is refreshed by versioned weight sync from the trainer (``load_weights``), with the trainer's
versioned precision map (``set_precisions``). Its precision is set by ``rollout.precision``: ``"fp8"`` runs
every FP8-capable GEMM in FP8 (current scaling, as FP8 inference engines do), which makes a real
train/inference mismatch for IcePop to correct; ``"follow"`` runs each layer as the trainer runs its forward GEMM
(fprop: per-GEMM precision leaves dgrad and wgrad to training alone); a layer
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
from precisionrt.numerics.fp8 import ScalingConfig
from precisionrt.layers.linear import LayerNumerics, precision_layers
from precisionrt.layers.attention import KVCache, SDPACoreAttention
from precisionrt.models.gpt import ModelConfig, build_gpt
from precisionrt.distributed.syncs import to_device
from precisionrt.models.tokenizer import load_tokenizer
from rl.algo import attribution
from rl.envs.task import STOP
from rl.inference.sessions import generate_continued
from rl.inference.decode import Completion, attention_mask, check_fits, decode, logits_of, model_device

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

    def forward(tokens: torch.Tensor, first: int) -> torch.Tensor:
        """Logits of the last position, for ``tokens`` at positions ``first..`` of the padded rows."""
        positions = (torch.arange(first, first + tokens.shape[1], device=device)[None] - pad[:, None]).clamp(min=0)
        keys = torch.arange(first + tokens.shape[1], device=device)[None]
        mask = attention_mask(keys >= pad[:, None], tokens.shape[1]) if padded else None
        return model(tokens, positions, mask).float()[:, -1]

    def feed(tok: torch.Tensor) -> torch.Tensor:
        nonlocal seqs
        seqs = torch.cat([seqs, tok[:, None]], dim=1)
        return forward(tok[:, None], seqs.shape[1] - 1) if kv_cache else forward(seqs, 0)

    with kv_caches(model) if kv_cache else nullcontext():
        out = decode(forward(seqs, 0), feed, max_new_tokens, temperature, top_p, generator, stop_ids, sync_every)
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
        self.sessions: dict = {}   # key -> rl.inference.sessions.Prefix: a multi-turn episode's cached keys and values
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
        ``bf16_layers`` in BF16 for this call only (per-layer mismatch attribution, ``rl/algo/attribution.py``)."""
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
        ``rollout.kv_cache`` each keeps its keys and values across calls (``rl/inference/sessions.py``), so a call encodes
        only what is new since the key's last call."""
        if keys is None or not self.cfg.kv_cache:
            return generate(self.model, prompts, max_new_tokens, self.model_cfg.seq_length, self.cfg.temperature,
                            self.cfg.top_p, generator, self.version, self.map_version, self.cfg.kv_cache,
                            self.stop_ids, self.cfg.sync_every)
        check_fits(prompts, max_new_tokens, self.model_cfg.seq_length)
        comps, prefixes, reused = generate_continued(
            self.model, prompts, [self.sessions.get(k) for k in keys], max_new_tokens, self.cfg.temperature,
            self.cfg.top_p, generator, self.version, self.map_version, self.stop_ids, self.cfg.sync_every)
        self.sessions.update(zip(keys, prefixes))
        self.reused_tokens += reused
        return comps
