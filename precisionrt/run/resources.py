"""Will a run fit? A memory estimate from the configuration alone, checked before anything is allocated.

The estimate is deliberately a floor, so that it never refuses a run that fits: AdamW keeps a weight, a
gradient and two moments per parameter; a step keeps, per layer and token, the activations its backward
needs (about ``10 h + 4 f`` values for attention and a gated MLP of width ``f``), the attention scores
(``heads x seq`` per token: the CPU's SDPA materialises them) and, at the output, fp32 logits, their softmax
and their gradient (``3 V`` per token). Optimizer internals, allocator slack, FP8 copies and framework
buffers come on top. A run whose floor already exceeds the memory the machine has is refused with the
estimate, so that the allocator (or the kernel's OOM killer, hours into a run) is never the error message.
"""

from __future__ import annotations

from precisionrt.config import ConfigError
from precisionrt.distributed.memory import GIB, MemoryEstimate, available_memory

__all__ = ["GIB", "MemoryEstimate", "available_memory", "check_fits", "parameter_count", "training_memory"]

def parameter_count(model, tensor_parallel_size: int = 1) -> int:
    """Parameters of one tensor-parallel rank of the byte GPT that ``precisionrt.models.gpt.build_gpt`` makes
    from ``model`` (a ``ModelConfig``): linear weights and embeddings split over the ranks, norms replicated."""
    h, f, layers, vocab = model.hidden_size, model.ffn_hidden_size, model.num_layers, model.vocab_size
    per_layer = 4 * h * h + (3 if model.swiglu else 2) * f * h
    embeddings = 2 * vocab * h + (model.seq_length * h if model.position_embedding == "learned_absolute" else 0)
    norms = (2 * layers + 1) * h
    return (layers * per_layer + embeddings) // tensor_parallel_size + norms


def training_memory(model, batch: int, tensor_parallel_size: int = 1) -> MemoryEstimate:
    """The floor of one rank's memory for a training step on ``batch`` sequences of ``model.seq_length``."""
    value = 2 if model.params_dtype == "bfloat16" else 4
    tokens, tp = batch * model.seq_length, tensor_parallel_size
    per_token_layer = (10 * model.hidden_size + 4 * model.ffn_hidden_size) // tp \
        + model.num_attention_heads // tp * model.seq_length
    return MemoryEstimate(parameters=4 * value * parameter_count(model, tp),
                          activations=value * tokens * model.num_layers * per_token_layer,
                          logits=3 * 4 * tokens * model.vocab_size // tp)


def check_fits(estimate: MemoryEstimate, what: str, keys: str, device: str = "cpu",
               available: int | None = None) -> None:
    """Refuse (ConfigError naming ``keys``) a run whose estimate exceeds the memory ``device`` has."""
    available = available_memory(device) if available is None else available
    if available is not None and estimate.total > available:
        raise ConfigError(f"{keys}: {what} needs at least {estimate.describe()}, but this machine has "
                          f"{available / GIB:,.1f} GiB available on {device}; lower them")
