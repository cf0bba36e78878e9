"""Hugging Face checkpoints in and out: ``from_hf`` builds a megatron-core ``GPTModel`` from a local HF
directory (Llama, Qwen2/Qwen2.5, Qwen3; fp32 or bf16; any tensor-parallel size that divides the heads), and
``to_hf`` writes one back that ``transformers`` loads. A round trip is bit-exact.

Why written here, not taken from a bridge (tried on Python 3.11, torch 2.13 CPU, megatron-core 0.16.1,
transformers 5.24): mbridge 0.15.1 needs Transformer Engine and CUDA as shipped, silently drops Llama 3's
rope scaling under transformers 5 (its ``"rope_scaling" in config`` test is false: logits off by 0.22, no
error), and a tied Qwen load mutates a name map its bridges share, so a later untied model exports its
embedding as the head. Megatron-Bridge 0.4+ needs Python 3.12; 0.3.1 needs Transformer Engine and fails to
build mamba-ssm. Megatron's own RoPE needs CUDA and ignores position ids: ``precisionrt.rope`` replaces it.

Floor 5 (``precisionrt.models``): may import ``config``, ``observe``, ``numerics``, ``distributed``, ``layers``
and ``runtime``; imported by ``run`` and the commands.
"""

from precisionrt.models.hf.arch import HFArch, HFCheckpointError
from precisionrt.models.hf.load import build_from_arch, from_hf, hf_layer_spec
from precisionrt.models.hf.names import TOKENIZER_FILES, name_map
from precisionrt.models.hf.save import MARKER, ExportRefused, gather_logits, hf_state_dict, to_hf

__all__ = ["HFArch", "HFCheckpointError", "ExportRefused", "MARKER", "TOKENIZER_FILES", "build_from_arch", "from_hf", "gather_logits",
           "hf_layer_spec", "hf_state_dict", "name_map", "to_hf"]
