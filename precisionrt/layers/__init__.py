"""Layers, floor 3: the GEMM seam and the modules around it.

Owns ``PrecisionLinear`` and its column/row-parallel variants (``linear.py``: the autograd function whose three
GEMMs run in FP8 or BF16, keeping megatron's tensor-parallel communication duties), the layer spec built on
them (``spec.py``) and the conversion of any megatron spec (``convert.py``), attention on any device with its
KV cache (``attention.py``), RoPE at explicit positions (``rope.py``), mixture-of-experts glue (``moe.py``) and
layer-name patterns (``names.py``).

May import: ``config``, ``observe``, ``numerics``, ``distributed``, torch and megatron-core.
"""
