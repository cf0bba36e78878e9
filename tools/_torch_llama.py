"""A plain-torch Llama-style GPT for benchmarks: the peers' arms (torch BF16 eager and compiled, torchao float8
tensorwise) at the shapes of precisionrt's megatron model. RMSNorm, grouped-query attention through SDPA with
RoPE, SwiGLU MLP, untied head; bias-free linears named as torchao's filters expect (``head`` is the output
layer, which stays in BF16 as the peers leave it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_tables(seq: int, head_dim: int, device, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, groups: int, ffn: int):
        super().__init__()
        self.heads, self.groups, self.head_dim = heads, groups, hidden // heads
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, hidden + 2 * groups * self.head_dim, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.fc1 = nn.Linear(hidden, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        kv = self.groups * self.head_dim
        q, k, v = self.qkv(self.norm1(x)).split([h, kv, kv], dim=-1)
        q = rotate(q.view(b, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = rotate(k.view(b, t, self.groups, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, t, self.groups, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.groups != self.heads)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, h))
        up, gate = self.fc1(self.norm2(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(up) * gate)


class TorchGPT(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, groups: int, ffn: int, vocab: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, groups, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.seq, self.head_dim = seq, hidden // heads

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of ``tokens`` ``[b, seq + 1]``."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        cos, sin = rope_tables(inputs.shape[1], self.head_dim, tokens.device)
        x = self.embed(inputs)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
