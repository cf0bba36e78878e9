"""Shim (old path): the megatron helpers that lived here moved to their floors. Kept because the README's
examples and users' scripts import ``ModelConfig``, ``init_parallel`` and ``transformer_config`` from here.

=========================================  ====================================
name                                       now in
=========================================  ====================================
``ModelConfig``, ``build_gpt``,            ``precisionrt.models.gpt``
``transformer_config``
``megatron_transformer_config``,           ``precisionrt.models.transformer``
``place_model``
``init_parallel``, ``resolve_device``      ``precisionrt.distributed.parallel``
``precision_layer_spec``                   ``precisionrt.layers.spec``
``SDPACoreAttention``, ``KVCache``         ``precisionrt.layers.attention``
``match_layers``, ``match_names``          ``precisionrt.layers.names``
=========================================  ====================================
"""

from precisionrt.distributed.parallel import init_parallel, resolve_device
from precisionrt.layers.attention import KVCache, SDPACoreAttention
from precisionrt.layers.names import match_layers, match_names
from precisionrt.layers.spec import precision_layer_spec
from precisionrt.models.gpt import ModelConfig, build_gpt, transformer_config
from precisionrt.models.transformer import megatron_transformer_config, place_model

__all__ = ["KVCache", "ModelConfig", "SDPACoreAttention", "build_gpt", "init_parallel", "match_layers",
           "match_names", "megatron_transformer_config", "place_model", "precision_layer_spec", "resolve_device",
           "transformer_config"]
