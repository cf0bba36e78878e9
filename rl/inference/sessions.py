"""Episodes that keep their KV cache across turns: the next action's decode encodes only what is new.

After an action, an episode's context grows by the action's last token and the observation; everything before
was already encoded. ``generate_continued`` takes, per row, the cached keys and values of a prefix of its prompt
(``Prefix``, from the row's previous call) and runs the model on the rest only, then decodes incrementally as
``rl.inference.rollout.generate`` does with ``kv_cache``. Rows with caches of different lengths share one batch: the
cached keys and values are left-padded to one length, the new tokens too, and a mask hides both pads (each row
keeps its own positions). A prefix is used only if the prompt really starts with its tokens, so a wrong or
stale key costs a full encode, never a wrong result; the engine drops all prefixes when its weights or
precisions change (they were computed with the old ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from precisionrt.layers.attention import KVCache, SDPACoreAttention
from precisionrt.distributed.syncs import to_device
from rl.envs.task import STOP
from rl.inference.decode import Completion, attention_mask, decode, model_device


@dataclass
class Prefix:
    tokens: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    """Per core attention layer: keys and values of ``tokens``, ``[len, groups, head_dim]``."""


@torch.no_grad()
def generate_continued(model, prompts: list[Sequence[int]], prefixes: list[Prefix | None], max_new_tokens: int,
                       temperature: float, top_p: float, generator: torch.Generator, version: int = -1,
                       map_version: int = 0, stop_ids: tuple[int, ...] = (STOP,), sync_every: int = 16
                       ) -> tuple[list[Completion], list[Prefix], int]:
    """One completion per prompt, each continuing its row's cached prefix; returns the completions, each row's
    new prefix (its prompt and all generated tokens but the last) and how many prompt tokens the caches spared.
    On the model's device, with ``rl.inference.rollout.generate``'s read budget (one read every ``sync_every`` steps, one
    transfer at the end)."""
    attn = [m for m in model.modules() if isinstance(m, SDPACoreAttention)]
    usable = [p if p is not None and len(p.tokens) < len(q) and list(q[:len(p.tokens)]) == p.tokens else None
              for p, q in zip(prefixes, prompts)]
    cached = [len(p.tokens) if p else 0 for p in usable]
    suffix = [q[c:] for q, c in zip(prompts, cached)]
    b, width_c, width_s = len(prompts), max(cached), max(len(s) for s in suffix)
    valid = torch.zeros(b, width_c + width_s, dtype=torch.bool)
    tokens = torch.zeros(b, width_s, dtype=torch.long)
    for i, (c, s) in enumerate(zip(cached, suffix)):
        valid[i, width_c - c:width_c] = True
        valid[i, width_c + width_s - len(s):] = True
        tokens[i, width_s - len(s):] = torch.tensor(list(s))
    start = torch.tensor(cached) - torch.tensor([width_s - len(s) for s in suffix])   # position of column 0
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for layer, m in enumerate(attn):
            m.kv_cache = KVCache()
            if width_c:
                ref = next(p.kv[layer][0] for p in usable if p is not None)
                key = ref.new_zeros(width_c, b, *ref.shape[1:])
                value = torch.zeros_like(key)
                for i, p in enumerate(usable):
                    if p is not None:
                        key[width_c - cached[i]:, i], value[width_c - cached[i]:, i] = p.kv[layer]
                m.kv_cache.key, m.kv_cache.value = key, value
        positions = to_device((start[:, None] + torch.arange(width_s)[None]).clamp(min=0), device)
        valid_d = to_device(valid, device)
        logits = model(to_device(tokens, device), positions, attention_mask(valid_d, width_s)).float()[:, -1]
        length = to_device(torch.tensor([len(q) for q in prompts]), device)   # the next position of each row
        ones = torch.ones(b, 1, dtype=torch.bool, device=device)

        def feed(tok: torch.Tensor) -> torch.Tensor:
            nonlocal valid_d
            valid_d = torch.cat([valid_d, ones], dim=1)
            logits = model(tok[:, None], length[:, None], attention_mask(valid_d, 1)).float()[:, -1]
            length.add_(1)
            return logits

        out = decode(logits, feed, max_new_tokens, temperature, top_p, generator, stop_ids, sync_every)
        comps = out.completions(prompts, version, map_version)
        new = []
        for i, (q, c) in enumerate(zip(prompts, comps)):   # the row's real positions, in order (host bookkeeping)
            real = [*range(width_c - cached[i], width_c), *range(width_c + width_s - len(suffix[i]), valid_d.shape[1])]
            keep = to_device(torch.tensor(real[:len(q) + len(c.tokens) - 1]), device)
            new.append(Prefix(list(q) + c.tokens[:-1], [(m.kv_cache.key[keep, i], m.kv_cache.value[keep, i])
                                                        for m in attn]))
    finally:
        for m in attn:
            m.kv_cache = None
        model.train(was_training)
    return comps, new, sum(cached)
