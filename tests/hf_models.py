"""Tiny Hugging Face checkpoints for the import/export tests, made on the spot with transformers' own classes
(no network): 2 layers, hidden 64, 4 query heads over 2 key/value groups. Every parameter is random, biases
and norm gains included, so a tensor loaded into the wrong place (or not at all) changes the logits."""

from __future__ import annotations

import torch

VOCAB = 320
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}

# name -> (transformers config class, its arguments)
CASES = {
    "llama3-rope": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE)),
    "llama-linear-tied": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 10000.0}, tie_word_embeddings=True)),
    "qwen2-tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "qwen3-tied": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
}


def hf_config(case: str, **overrides):
    import transformers

    cls, extra = CASES[case]
    return getattr(transformers, cls)(**{**COMMON, **extra, **overrides})


def make_checkpoint(path, case: str, dtype=torch.float32, seed: int = 0, max_shard_size=None, **overrides):
    """Save a random-init model of ``case`` under ``path``; returns the transformers model (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(case, **overrides)).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:   # norms around 1, biases around 0: both random, so each one matters
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def batch(seed: int = 0, length: int = 12, offset: int = 5):
    """Token ids, an HF attention mask (row 1 right-padded after 8 tokens) and position ids that start at
    ``offset`` (row 1 with a gap of 4 after 6 tokens); plus megatron's mask for the same batch (True = masked out: causal and padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, length), generator=g)
    hf_mask = torch.ones(2, length, dtype=torch.long)
    hf_mask[1, 8:] = 0
    positions = torch.arange(length)[None].repeat(2, 1) + offset
    positions[1, 6:] += 4   # a gap: RoPE is relative, so only uneven position ids show they are used
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = ~(causal[None] & hf_mask.bool()[:, None, :])[:, None]
    return ids, hf_mask, positions, mask


def bf16_linears(model) -> None:
    """Make ``model``'s transformer linears compute as precisionrt's BF16 GEMM does (operands cast to bf16, the
    product cast back, the bias added after); the output head stays in the model's dtype, as ours does."""
    def forward(self, x):
        y = (x.to(torch.bfloat16) @ self.weight.to(torch.bfloat16).t()).to(x.dtype)
        return y if self.bias is None else y + self.bias

    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = forward.__get__(module)
