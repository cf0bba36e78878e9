"""What every model builder shares: megatron's ``TransformerConfig`` with this project's settings for a
device, and placing a freshly built model on its dtype and device (its layers' numerics state with it)."""

from __future__ import annotations

import warnings

import torch

import precisionrt.distributed.mcore  # noqa: F401  (first: quiet megatron import)
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from precisionrt.layers.linear import precision_layers


def megatron_transformer_config(device: str | torch.device, **dims) -> TransformerConfig:
    """A ``TransformerConfig`` of ``dims`` with this project's settings for ``device``: no bias on the
    linears and no dropout unless ``dims`` say otherwise, CPU initialisation, and the fusions ``device``
    can run (see ``transformer_config``)."""
    cuda = torch.device(device).type == "cuda"
    settings = dict(add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
                    use_cpu_initialization=True, masked_softmax_fusion=False, persist_layer_norm=False,
                    gradient_accumulation_fusion=False, apply_rope_fusion=False,
                    bias_dropout_fusion=cuda, cross_entropy_loss_fusion=cuda,
                    # the synchronize after batched pipeline send/receive guards a CUDA stream race
                    batch_p2p_sync=cuda,
                    bias_activation_fusion=cuda and dims.get("gated_linear_unit", False))
    settings.update(dims)
    with warnings.catch_warnings():  # megatron-core 0.16 warns about its own default cuda_graph_scope
        warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
        return TransformerConfig(**settings)


def place_model(model: GPTModel, dtype: torch.dtype, device: str | torch.device) -> GPTModel:
    """Cast a freshly built model to ``dtype`` and move it to ``device``, its layers' numerics state with it."""
    # Megatron's torch norms are created in fp32 whatever params_dtype says; a bf16 model must not run its
    # norms (and, through type promotion, every activation after them) in fp32.
    model.to(dtype=dtype)
    if torch.device(device).type != "cpu":
        model.to(device)
        for layer in precision_layers(model).values():   # numerics state follows its layer's weight
            layer.numerics = type(layer.numerics)(layer.numerics.scaling_config, layer.weight.device)
    return model
