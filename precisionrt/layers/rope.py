"""Rotary position embeddings at explicit position ids, on any device.

megatron-core 0.16's ``RotaryEmbedding`` has two limits for models brought from Hugging Face: it moves its
frequencies to the CUDA device on first use (so a CPU model cannot run it), and it rotates by the row index
``0..s-1`` whatever ``position_ids`` say (so a right-padded batch works but a sequence that continues at
position 17, or a left-padded prompt, is rotated wrongly). ``PositionRotaryEmbedding`` computes the angles
from the position ids themselves, in float32 on their device, as ``transformers`` does.

It enters the model through the one path of ``GPTModel._preprocess`` that hands ``position_ids`` to its
rotary module (the ``mrope`` branch); ``install`` switches a built ``GPTModel`` onto it. Megatron then
applies the angles with its own unfused ``apply_rotary_pos_emb`` (cos and sin cast to the activations'
dtype, halves rotated: the non-interleaved layout both libraries use).

The inverse frequencies follow the ``rope_type`` of an HF config: ``default``, ``linear`` and ``llama3``
(the formulas of ``transformers.modeling_rope_utils``, re-written so that a change there is caught by the
tests against transformers instead of followed silently). Any other type is refused by the importer.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inverse_frequencies(head_dim: int, rope: dict) -> torch.Tensor:
    """``inv_freq`` [head_dim / 2] (float32) for ``rope``: ``rope_theta``, ``rope_type`` and its parameters."""
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {list(SUPPORTED_ROPE_TYPES)})")
    base = float(rope["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim))
    if rope_type == "linear":
        return inv_freq / rope["factor"]
    if rope_type == "llama3":
        return _llama3(inv_freq, rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                       rope["original_max_position_embeddings"])
    return inv_freq


def _llama3(inv_freq: torch.Tensor, factor: float, low: float, high: float, old_context: int) -> torch.Tensor:
    """Llama 3.1's band-wise scaling: long wavelengths divided by ``factor``, short ones kept, the band between
    interpolated smoothly."""
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


class PositionRotaryEmbedding(torch.nn.Module):
    """Angles ``[s, b, 1, head_dim]`` for position ids ``[b, s]``; called as megatron calls its mrope module."""

    def __init__(self, inv_freq: torch.Tensor):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, position_ids: torch.Tensor, mrope_section=None, cp_group=None) -> torch.Tensor:
        if position_ids is None:
            raise ValueError("a model with position-id RoPE needs position_ids in its forward")
        freqs = position_ids[..., None].to(self.inv_freq) * self.inv_freq   # [b, s, d/2], float32
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.transpose(0, 1)[:, :, None, :]


def install(model, inv_freq: torch.Tensor) -> None:
    """Switch a ``GPTModel`` built with ``position_embedding_type="rope"`` onto position-id RoPE."""
    if getattr(model, "rotary_pos_emb", None) is None:
        raise ValueError("model has no rotary embedding (build it with position_embedding_type='rope')")
    model.rotary_pos_emb = PositionRotaryEmbedding(inv_freq.to(model.rotary_pos_emb.inv_freq.device))
    model.position_embedding_type = "mrope"
    model.mrope_section = None
